"""The package has no import circle: the library (compare, training, procedures, ...) never imports the CLI's
modules (`lorakit.cli`, `lorakit.commands`), not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import lorakit

CLI_MODULES = {"lorakit.cli", "lorakit.commands"}


def imported_modules(path: Path, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_library_modules_never_import_the_cli():
    root = Path(lorakit.__file__).parent
    offenders = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root.parent).with_suffix("")
        module = ".".join(relative.parts)
        if module in CLI_MODULES or module == "lorakit.__main__":
            continue
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        package = package.removesuffix(".__init__")
        bad = imported_modules(path, package) & CLI_MODULES
        if bad:
            offenders[module] = sorted(bad)
    assert not offenders, offenders
