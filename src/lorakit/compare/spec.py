"""Method specs of `lorakit compare --methods`: "lora,olora,mini:outer=normal:lr=3e-5,mini:a=64,b=64,lora:r=4",
"melora:blocks=4" (a method's own options), "lora:procedure=flat/rho=0.1", "lora:optimizer=rite",
"mini:lr-sweep=1e-3/3e-3/1e-2" (this method's own learning-rate grid; "lr-sweep=auto": centred on its documented rate),
"lorta:targets=q_proj/k_proj/v_proj/o_proj" (module suffixes, "/"-separated).

Methods are comma-separated; a method's options follow a colon, separated by colons or commas (a comma-separated
part that holds "=" and no method name continues the previous method's options). Values that are lists use "/".
"""

from __future__ import annotations

import math
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
    "targets": ("targets", lambda v: v.replace("/", ",")),  # lorta:targets=q_proj/k_proj/v_proj/o_proj
    "procedure": ("procedure", lambda v: v.replace("/", ":", 1).replace("/", ",")),  # procedure=flat/rho=0.1
    "optimizer": ("optimizer", str),
    "quantize": ("quantize", str),  # mini:quantize=nf4
    "checkpointing": ("gradient_checkpointing", lambda v: v.lower() in ("1", "true", "yes")),
}


# The learning rate each method's documentation recommends (README, The methods): `--lr-sweep auto` centres a grid
# of SWEEP_POINTS rates, SWEEP_FACTOR apart, on it.
DOCUMENTED_LR = {
    "lora": 3e-4,
    "olora": 1e-4,  # about 9x below LoRA's: the reproduction's sweeps (docs/reproduction.md)
    "mini": 3e-3,  # orthonormal (default) and qr outer matrices: ~10x LoRA's
    "loraxs": 3e-3,
    "melora": 3e-4,
    "prolora": 3e-4,
    "mora": 3e-4,
    "lorta": 1e-3,
}
MINI_NORMAL_LR = 3e-6  # mini:outer=normal scales the step by ~sqrt(in*out): ~100x below LoRA's (README)
SWEEP_FACTOR = 3.0
SWEEP_POINTS = 3


@dataclass
class MethodSpec:
    label: str
    method: str
    overrides: dict = field(default_factory=dict)
    sweep: list[float] | str | None = None  # this method's own grid (lr-sweep=a/b/c) or "auto"

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
    for spec in specs:
        if spec.sweep is not None and "lr" in spec.overrides:
            raise ConfigError(
                f"--methods {spec.label}: gives both lr= and lr-sweep=; keep lr= for a fixed rate or lr-sweep= to sweep"
            )
    return specs


def _apply(spec: MethodSpec, options: str) -> None:
    for option in filter(None, options.split(":")):
        key, eq, value = option.partition("=")
        if key == "lr-sweep" and eq:
            spec.sweep = parse_sweep(f"--methods {spec.method}:lr-sweep", value, "/")
            continue
        method_options = METHODS[spec.method].options  # the method's own (melora:blocks=4), checked when validated
        if eq and key in method_options and key not in OPTIONS:
            spec.overrides.setdefault("option", []).append(f"{key}={value}")
            continue
        if not eq or key not in OPTIONS:
            keys = ", ".join([*OPTIONS, "lr-sweep", *method_options])
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


def parse_sweep(flag: str, text: str, separator: str = ",") -> list[float] | str:
    """A learning-rate grid: "auto", or positive rates separated by `separator` (returned sorted)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        rates = [float(v) for v in text.split(separator) if v.strip()]
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r} must be 'auto' or learning rates separated by {separator!r}, e.g. "
            f"{separator.join(['1e-4', '3e-4', '1e-3'])}"
        ) from None
    if not rates:
        raise ConfigError(f"{flag} is empty; give 'auto' or learning rates such as 1e-4{separator}3e-4{separator}1e-3")
    if any(not math.isfinite(r) or r <= 0 for r in rates):
        raise ConfigError(f"{flag} {text!r} holds a rate that is not positive; use rates > 0")
    rates = [round_rate(r) for r in rates]
    if len(set(rates)) != len(rates):
        raise ConfigError(f"{flag} {text!r} repeats a value")
    return sorted(rates)


def round_rate(lr: float) -> float:
    """A rate rounded to 6 significant digits, so that 3e-4 * 3 is 0.0009 (as printed and as used)."""
    return float(f"{lr:.6g}")


def documented_lr(spec: MethodSpec) -> float:
    if spec.method == "mini" and spec.overrides.get("mini_outer") == "normal":
        return MINI_NORMAL_LR
    return DOCUMENTED_LR.get(spec.method, DOCUMENTED_LR["lora"])


def initial_grid(spec: MethodSpec, global_sweep: list[float] | str | None) -> list[float] | None:
    """The rates a method's sweep starts from: its own grid, else the global one; "auto" centres SWEEP_POINTS rates
    SWEEP_FACTOR apart on its documented rate. None: no sweep (none asked for, or the method fixes lr=)."""
    if "lr" in spec.overrides:
        return None
    choice = spec.sweep if spec.sweep is not None else global_sweep
    if choice is None:
        return None
    if choice == "auto":
        centre, half = documented_lr(spec), SWEEP_POINTS // 2
        return [round_rate(centre * SWEEP_FACTOR**k) for k in range(-half, SWEEP_POINTS - half)]
    return sorted(choice)
