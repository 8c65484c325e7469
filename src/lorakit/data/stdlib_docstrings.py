"""`stdlib-docstrings`: a built-in instruction dataset generated from the Python standard library on this machine.

instruction = "Write the docstring summary for this function." + the function's source without its docstring
output      = the first paragraph of its docstring

Deterministic: files in sorted order, and the train / eval split is by top-level module name (a module and its
submodules are all in one split), so no module appears in both. Nothing of it is stored in the repository.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import sysconfig
import textwrap
from pathlib import Path

NAME = "stdlib-docstrings"
INSTRUCTION = "Write the docstring summary for this function."
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
EVAL_BUCKETS = 10  # one top-level module in ten goes to eval
MAX_SOURCE_CHARS = 1200


def is_eval_module(top_level: str) -> bool:
    return int(hashlib.sha256(top_level.encode()).hexdigest(), 16) % EVAL_BUCKETS == 0


def _summary(docstring: str) -> str:
    first = inspect.cleandoc(docstring).split("\n\n", 1)[0]
    return " ".join(line.strip() for line in first.splitlines()).strip()


def _function_records(path: Path, module: str) -> list[dict]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    records = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        docstring = ast.get_docstring(node, clean=False)
        if not docstring or node.name.startswith("__") or len(node.body) < 2:
            continue
        doc_node = node.body[0]
        body = lines[node.lineno - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(body)).strip()
        summary = _summary(docstring)
        if not 40 <= len(code) <= MAX_SOURCE_CHARS or not 10 <= len(summary) <= 300:
            continue
        records.append({"instruction": INSTRUCTION, "input": code, "output": summary, "module": module})
    return records


@functools.lru_cache(maxsize=1)
def _all_records(root: str) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    train, evaluation = [], []
    base = Path(root)
    for path in sorted(base.rglob("*.py")):
        relative = path.relative_to(base)
        if SKIP_DIRS & set(relative.parts[:-1]) or relative.parts[0].startswith(("test", "_")):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        (evaluation if is_eval_module(relative.parts[0].removesuffix(".py")) else train).extend(
            _function_records(path, module)
        )
    return tuple(train), tuple(evaluation)


def load(split: str = "train", root: str | None = None) -> list[dict]:
    """Records of the given split ("train" or "eval") as instruction / input / output dicts."""
    train, evaluation = _all_records(root or sysconfig.get_paths()["stdlib"])
    return [dict(r) for r in (train if split == "train" else evaluation)]
