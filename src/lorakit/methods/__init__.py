"""The method registry: every module in this package registers its layer class with `@register_method`.

Adding a method is one new file here; it is discovered automatically.
"""

from __future__ import annotations

import importlib
import pkgutil

METHODS: dict = {}


def register_method(cls):
    """Class decorator: make `cls.method` available as AdapterConfig(method=...)."""
    if not cls.method or cls.method in METHODS:
        raise RuntimeError(f"method name {cls.method!r} is empty or registered twice")
    METHODS[cls.method] = cls
    return cls


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
