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
import json
import sys
import sysconfig
import textwrap
from pathlib import Path

from ..atomic import write_json

NAME = "stdlib-docstrings"
INSTRUCTION = "Write the docstring summary for this function."
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
EVAL_BUCKETS = 10  # one top-level module in ten goes to eval
MAX_SOURCE_CHARS = 1200
VERSION = 1  # bump when the generation rules change (invalidates cached copies)


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
    """Both splits; cached as JSON in the lorakit cache, keyed by the stdlib's path and Python version."""
    from ..models import cache_dir

    key = hashlib.sha256(f"{root}:{sys.version}:{VERSION}".encode()).hexdigest()[:16]
    cached = cache_dir() / "datasets" / f"{NAME}-{key}.json"
    if cached.is_file():
        try:
            data = json.loads(cached.read_text())
            return tuple(data["train"]), tuple(data["eval"])
        except (OSError, ValueError, KeyError):
            pass  # regenerate below
    train, evaluation = _generate(root)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json(cached, {"train": train, "eval": evaluation})
    except OSError:
        pass  # caching only saves time
    return tuple(train), tuple(evaluation)


def _generate(root: str) -> tuple[list[dict], list[dict]]:
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
    return train, evaluation


def load(split: str = "train", root: str | None = None) -> list[dict]:
    """Records of the given split ("train" or "eval") as instruction / input / output dicts."""
    train, evaluation = _all_records(root or sysconfig.get_paths()["stdlib"])
    return [dict(r) for r in (train if split == "train" else evaluation)]
