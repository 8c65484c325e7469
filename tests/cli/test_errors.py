"""Every row of docs/errors.md, run as a real CLI subprocess: exit 2, the exact one-line message, no traceback,
nothing written to --out."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from error_cases import build_files, parse_doc, run_row

ROWS = parse_doc()


def test_the_table_is_complete():
    from pathlib import Path

    assert len(ROWS) >= 25
    assert [row["number"] for row in ROWS] == list(range(1, len(ROWS) + 1))
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"lists {len(ROWS)} bad inputs" in readme  # the count README gives is the table's


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


def _crash(args):
    raise RuntimeError("something broke\nover two lines")


def test_an_internal_error_is_one_line_and_exit_1(monkeypatch, capsys):
    from lorakit import cli, commands

    monkeypatch.setattr(commands, "run_inspect", _crash)
    monkeypatch.delenv("LORAKIT_DEBUG", raising=False)
    assert cli.main(["inspect", "somewhere"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "lorakit: internal error: RuntimeError: something broke over two lines; "
        "re-run with LORAKIT_DEBUG=1 for the full traceback and report it"
    ]


def test_lorakit_debug_lets_the_traceback_through(monkeypatch):
    from lorakit import cli, commands

    monkeypatch.setattr(commands, "run_inspect", _crash)
    monkeypatch.setenv("LORAKIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        cli.main(["inspect", "somewhere"])


def test_an_internal_error_in_a_real_process_prints_no_traceback():
    code = (
        "import sys, lorakit.commands as c\n"
        "def boom(args): raise KeyError('model.layers.0')\n"
        "c.run_inspect = boom\n"
        "from lorakit.cli import main\n"
        "sys.exit(main(['inspect', 'x']))\n"
    )
    env = {**os.environ, "LORAKIT_DEBUG": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "lorakit: internal error: KeyError: 'model.layers.0'; "
        "re-run with LORAKIT_DEBUG=1 for the full traceback and report it"
    )
