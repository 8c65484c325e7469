"""Training procedures: ways of running training that are not adapter shapes (Flat-LoRA, Chain of LoRA, ...).

A procedure is one file in this package: a `Procedure` subclass (see `base.py`) registered with
`@register_procedure`. `lorakit train --procedure NAME[:key=value,...]` selects one; the training loop calls its
hooks at the named moments of a step and keeps its state in every checkpoint.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from ..options import validate_options

PROCEDURES: dict = {}


def register_procedure(cls):
    """Class decorator: make `cls.name` available as `--procedure NAME`."""
    if not cls.name or cls.name in PROCEDURES:
        raise RuntimeError(f"procedure name {cls.name!r} is empty or registered twice")
    PROCEDURES[cls.name] = cls
    return cls


def parse_procedure(text: str) -> tuple[str, dict]:
    """"flat:rho=0.1,..." -> ("flat", {"rho": 0.1}); options validated against the procedure's declaration."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in PROCEDURES:
        known = ", ".join(sorted(PROCEDURES))
        raise ConfigError(f"--procedure {name!r} is unknown; use one of: {known} (with options like flat:rho=0.05)")
    options = {}
    for item in filter(None, (part.strip() for part in rest.replace(":", ",").split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"--procedure {text!r}: {item!r} is not key=value; write e.g. {name}:key=value")
        options[key.strip()] = value.strip()
    try:
        return name, validate_options(name, PROCEDURES[name].options, options)
    except ConfigError as exc:
        raise ConfigError(f"--procedure {text!r}: {exc}") from None


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
