"""The built-in dataset: generated from this machine's standard library, split by module, deterministic."""

from __future__ import annotations

from lorakit.data import stdlib_docstrings


def test_split_is_disjoint_by_module_and_deterministic():
    train, evaluation = stdlib_docstrings.load("train"), stdlib_docstrings.load("eval")
    assert len(train) > 1000 and len(evaluation) > 100
    top = lambda rows: {r["module"].split(".")[0] for r in rows}  # noqa: E731
    assert not top(train) & top(evaluation)
    regenerated_train, _ = stdlib_docstrings._generate(__import__("sysconfig").get_paths()["stdlib"])
    assert regenerated_train == train


def test_records_hold_source_without_docstring_and_first_paragraph():
    record = next(r for r in stdlib_docstrings.load("train") if r["module"] == "shlex" and "def join" in r["input"])
    assert record["instruction"] == stdlib_docstrings.INSTRUCTION
    assert record["input"].startswith("def join(split_command):")
    assert '"""' not in record["input"]
    assert record["output"] == "Return a shell-escaped string from *split_command*."
