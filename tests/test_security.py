"""Security: no pickle anywhere in the package, remote code off by default, files validated before use."""

from __future__ import annotations

import re
from pathlib import Path

import lorakit
from lorakit.training.run_config import TrainConfig

PACKAGE = Path(lorakit.__file__).parent
FORBIDDEN = [
    r"\bimport pickle\b",
    r"\bpickle\.",
    r"\btorch\.load\(",
    r"\bcloudpickle\b",
    r"\bdill\b",
    r"trust_remote_code=True",
    r"weights_only=False",
    r"(?<![.\w])eval\(",
    r"(?<![.\w])exec\(",
]


def test_package_never_unpickles_or_runs_remote_code():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(pattern, line) for pattern in FORBIDDEN):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_remote_code_is_off_unless_asked():
    assert TrainConfig().trust_remote_code is False
    from lorakit.cli import build_parser

    for command in (["train", "--out", "x"], ["eval", "--data", "d"], ["compare", "--out", "x"]):
        assert build_parser().parse_args(command).trust_remote_code is False
    assert build_parser().parse_args(["train", "--out", "x", "--trust-remote-code"]).trust_remote_code is True
