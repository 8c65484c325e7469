"""Every row of docs/errors.md, run as a real CLI subprocess: exit 2, the exact one-line message, no traceback,
nothing written to --out."""

from __future__ import annotations

import hashlib

import pytest
from error_cases import build_files, parse_doc, run_row

ROWS = parse_doc()


def test_the_table_is_complete():
    assert len(ROWS) >= 25
    assert [row["number"] for row in ROWS] == list(range(1, len(ROWS) + 1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_files(tmp_path_factory.mktemp("errors"))


def _snapshot(path: str) -> str:
    from pathlib import Path

    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else repr(sorted(q.name for q in p.iterdir()))


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['number']}-{r['input']}" for r in ROWS])
def test_bad_input(row, files, tmp_path):
    out = str(tmp_path / "out")
    before = _snapshot(files["outfile"])
    result = run_row(row["command"], files, out)
    expected = row["message"].format(**files, out=out)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if ": error:" in line]
    assert error_lines == [expected]
    assert not (tmp_path / "out").exists()
    assert _snapshot(files["outfile"]) == before
