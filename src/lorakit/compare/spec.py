"""Method specs of `lorakit compare --methods`: "lora,olora,mini:outer=normal:lr=3e-5,mini:a=64,b=64,lora:r=4",
"melora:blocks=4" (a method's own options), "lora:procedure=flat/rho=0.1", "lora:optimizer=rite".

Methods are comma-separated; a method's options follow a colon, separated by colons or commas (a comma-separated
part that holds "=" and no method name continues the previous method's options).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..methods import METHODS

# inline key -> (TrainConfig field, type)
OPTIONS = {
    "r": ("rank", int),
    "rank": ("rank", int),
    "alpha": ("alpha", float),
    "lr": ("lr", float),
    "a": ("mini_a", int),
    "b": ("mini_b", int),
    "outer": ("mini_outer", str),
    "init": ("init", str),
    "dropout": ("dropout", float),
    "rslora": ("rslora", lambda v: v.lower() in ("1", "true", "yes")),
    "targets": ("targets", str),
    "procedure": ("procedure", lambda v: v.replace("/", ":", 1).replace("/", ",")),  # procedure=flat/rho=0.1
    "optimizer": ("optimizer", str),
}


@dataclass
class MethodSpec:
    label: str
    method: str
    overrides: dict = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label)


def parse_methods(text: str) -> list[MethodSpec]:
    specs: list[MethodSpec] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        head, _, rest = part.partition(":")
        if "=" in head and specs:  # "b=64" continues the previous method's options
            _apply(specs[-1], part)
            specs[-1].label += "," + part
            continue
        if head not in METHODS:
            raise ConfigError(
                f"--methods: {head!r} is not a method; use {', '.join(sorted(METHODS))} with options like mini:outer=normal"
            )
        spec = MethodSpec(label=part, method=head)
        if rest:
            _apply(spec, rest)
        specs.append(spec)
    if not specs:
        raise ConfigError("--methods is empty; name at least one method, e.g. lora,olora,mini")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods names {labels} more than once; give each variant once")
    return specs


def _apply(spec: MethodSpec, options: str) -> None:
    for option in filter(None, options.split(":")):
        key, eq, value = option.partition("=")
        method_options = METHODS[spec.method].options  # the method's own (melora:blocks=4), checked when validated
        if eq and key in method_options and key not in OPTIONS:
            spec.overrides.setdefault("option", []).append(f"{key}={value}")
            continue
        if not eq or key not in OPTIONS:
            keys = ", ".join([*OPTIONS, *method_options])
            raise ConfigError(
                f"--methods: option {option!r} of {spec.method} is unknown; use key=value with keys {keys}"
            )
        name, cast = OPTIONS[key]
        try:
            spec.overrides[name] = cast(value)
        except ValueError:
            raise ConfigError(f"--methods: {key}={value!r} of {spec.method} is not a valid {cast.__name__}") from None


def parse_numbers(flag: str, text: str, cast) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be comma-separated {cast.__name__}s") from None
    if not values:
        raise ConfigError(f"{flag} is empty")
    if len(set(values)) != len(values):
        raise ConfigError(f"{flag} {text!r} repeats a value")
    return values
