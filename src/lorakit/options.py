"""Method options: `AdapterConfig.extra` holds each method's own settings (MELoRA's `blocks`, MoRA's `kind`, ...).

A method declares them as `options = {"blocks": Option(2, int, "mini-LoRAs on the diagonal", minimum=1)}`;
`validate_options` checks `extra` against that declaration (unknown keys, types, choices, ranges) with a one-line
ConfigError naming the key and the fix, and casts strings from the CLI (`--option blocks=4`) to the declared type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Option:
    default: object
    kind: type  # int, float, str or bool
    help: str
    choices: tuple | None = None
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive

    def describe(self) -> str:
        if self.choices:
            return f"one of {', '.join(map(str, self.choices))}"
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        return (
            f"{'an integer' if self.kind is int else 'a number' if self.kind is float else 'a ' + self.kind.__name__}"
            + (f" {' and '.join(bounds)}" if bounds else "")
        )


def _cast(option: Option, key: str, value):
    kind = option.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise ValueError
    if kind is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        result = float(value)
        if not math.isfinite(result):
            raise ValueError
        return result
    if not isinstance(value, str):
        raise ValueError
    return value


def validate_options(method: str, declared: dict[str, Option], extra: dict) -> dict:
    """Return `extra` with every value cast to its declared type; ConfigError on anything else."""
    unknown = sorted(set(extra) - set(declared))
    if unknown:
        known = f"its options are: {', '.join(sorted(declared))}" if declared else "it has no options"
        raise ConfigError(f"option {unknown[0]!r} is unknown for method {method}; {known}")
    checked = {}
    for key, value in extra.items():
        option = declared[key]
        try:
            cast = _cast(option, key, value)
        except (TypeError, ValueError):
            raise ConfigError(f"option {key}={value} of {method} is invalid; use {option.describe()}") from None
        invalid = (
            (option.choices is not None and cast not in option.choices)
            or (option.minimum is not None and cast < option.minimum)
            or (option.maximum is not None and cast > option.maximum)
        )
        if invalid:
            raise ConfigError(f"option {key}={value} of {method} is invalid; use {option.describe()}")
        checked[key] = cast
    return checked


def parse_option_strings(items: list[str] | None) -> dict[str, str]:
    """CLI `--option key=value` (repeatable) -> {key: value}; values are cast when the config is validated."""
    parsed = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"--option {item!r} is invalid; write it as key=value, e.g. --option blocks=4")
        parsed[key.strip()] = value.strip()
    return parsed
