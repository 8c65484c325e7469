"""`AdapterConfig`: what to adapt and how. Validated on construction; method-specific checks live in the method."""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field

from .errors import ConfigError
from .options import validate_options

INITS = ("kaiming", "gaussian")
MINI_OUTERS = ("orthonormal", "normal", "qr")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class AdapterConfig:
    """Configuration of one adapter.

    Args:
        method: "lora", "olora", "mini", "loraxs", "melora", "prolora", "mora" or "lorta" (`lorakit.methods.METHODS`).
        r: rank of the low-rank update (the inner rank for LoRA-Mini).
        alpha: scale numerator; the update is scaled by alpha/r (alpha/sqrt(r) with `rslora`). Defaults to r.
        targets: "all-linear" (every nn.Linear / transformers Conv1D except the output head), a list of module-name
            suffixes (["q_proj", "v_proj"]), or a regular expression matched against the full module name.
        exclude: modules to leave alone, in the same forms as `targets` (except "all-linear").
        dropout: dropout probability on the adapter input.
        rslora: scale by alpha/sqrt(r) (Kalajdzievski 2023) instead of alpha/r.
        init: "kaiming" (uniform, a=sqrt(5)) or "gaussian" (std 1/r) for the trained factor that starts random.
        seed: seeds every random matrix; each module draws from its own generator seeded by (seed, module name).
        mini_a, mini_b: LoRA-Mini outer ranks (A_out is mini_a x in, B_out is out x mini_b).
        mini_outer: LoRA-Mini frozen outer matrices: "orthonormal" (default), "normal" (N(0,1), the authors' code)
            or "qr" (orthonormal bases of the frozen weight's leading columns and rows).
        extra: method options, validated against the method's declared `options` (e.g. {"blocks": 4} for MELoRA).
        modules_to_save: module-name suffixes (["lm_head"], ["score"]) of modules trained in full, as a copy beside the
            frozen original (`lorakit.saved_modules`; PEFT's `modules_to_save`).
        trainable_tokens: token ids whose input-embedding rows (and output-head rows, unless tied) train, as k x d
            rows beside the frozen embedding (`lorakit.token_rows`; PEFT's `trainable_token_indices`).
        target_parameters: suffixes of 3-D expert parameters (["experts.gate_up_proj", "experts.down_proj"]) that get
            a rank-r LoRA per expert (`lorakit.expert_lora`; PEFT's `target_parameters`); method "lora" only.
    """

    method: str = "lora"
    r: int = 8
    alpha: float | None = None
    targets: str | list[str] = "all-linear"
    exclude: str | list[str] | None = None
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    seed: int = 0
    mini_a: int = 32
    mini_b: int = 32
    mini_outer: str = "orthonormal"
    extra: dict = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    trainable_tokens: list[int] | None = None
    target_parameters: list[str] | None = None

    def __post_init__(self):
        from .methods import METHODS  # late import: methods import the layer, which imports this module

        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is unknown; use one of: {', '.join(sorted(METHODS))}")
        if not _is_int(self.r) or self.r <= 0:
            raise ConfigError(f"r={self.r!r} is invalid; the rank must be a positive integer such as 8 or 16")
        if self.alpha is None:
            self.alpha = self.r
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha!r} is invalid; alpha must be a positive number (default: r)")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} is invalid; use a probability in [0, 1)")
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"rslora={self.rslora!r} is invalid; use True or False")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r} is unknown; use one of: {', '.join(INITS)}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} is invalid; use a non-negative integer")
        self.targets = _check_pattern("targets", self.targets, allow_all_linear=True)
        if self.exclude is not None:
            self.exclude = _check_pattern("exclude", self.exclude, allow_all_linear=False)
        if not isinstance(self.extra, dict):
            raise ConfigError("extra must be a dict of method-specific options")
        self.modules_to_save = _check_names(self.modules_to_save)
        self.trainable_tokens = _check_token_ids(self.trainable_tokens)
        self.target_parameters = _check_names(self.target_parameters, "target_parameters",
                                              "['experts.gate_up_proj', 'experts.down_proj']")  # fmt: skip
        layer_cls = METHODS[self.method]
        self.extra = validate_options(self.method, layer_cls.options, self.extra)
        layer_cls.check_config(self)
        self._warn_ignored(layer_cls)

    def _warn_ignored(self, layer_cls) -> None:
        """One line for each kind of field set away from its default that this method never reads."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        # stacklevel 4: _warn_ignored <- __post_init__ <- the dataclass __init__ <- the caller
        if self.init != defaults["init"] and layer_cls.init_ignored:
            warnings.warn(f"{self.method} ignores init={self.init!r}: {layer_cls.init_ignored}", stacklevel=4)
        if self.method != "mini":
            fields = ("mini_a", "mini_b", "mini_outer")
            mini = [f"{k}={getattr(self, k)!r}" for k in fields if getattr(self, k) != defaults[k]]
            if mini:
                warnings.warn(
                    f"{self.method} ignores {' and '.join(mini)}: they shape LoRA-Mini's outer matrices "
                    "(method='mini') only",
                    stacklevel=4,
                )

    def option(self, key: str):
        """The value of a method option in `extra`, or its declared default."""
        from .methods import METHODS

        return self.extra.get(key, METHODS[self.method].options[key].default)

    @property
    def scale(self) -> float:
        """The factor s multiplying the low-rank update."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("modules_to_save", "trainable_tokens", "target_parameters"):  # unset: the dict (and adapter.json) of earlier versions
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> AdapterConfig:
        """Build from a dict (e.g. a file's JSON); unknown or mistyped fields raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError("the adapter config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**data)


def _check_names(value, field: str = "modules_to_save", example: str = "['lm_head'] or ['score']") -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list) and value and all(isinstance(v, str) and v and v == v.strip(".") for v in value):
        return list(dict.fromkeys(value))
    raise ConfigError(
        f"{field}={value!r} is invalid; use a list of name suffixes such as {example}"
    )


def _check_token_ids(value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value):
        if len(set(value)) == len(value):
            return [int(v) for v in value]
    raise ConfigError(
        f"trainable_tokens={value!r} is invalid; use a list of distinct non-negative token ids such as [49152, 49153]"
    )


def _check_pattern(name: str, value, *, allow_all_linear: bool):
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        if value == "all-linear" and not allow_all_linear:
            raise ConfigError(f'{name}="all-linear" is not allowed here; give module-name suffixes or a regex')
        if not value:
            raise ConfigError(f"{name} is empty; give 'all-linear', module-name suffixes or a regex")
        if value != "all-linear":
            import re

            try:
                re.compile(value)
            except re.error as exc:
                raise ConfigError(f"{name}={value!r} is not a valid regular expression ({exc})") from None
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise ConfigError(
        f"{name}={value!r} is invalid; use 'all-linear', a list of module-name suffixes such as "
        "['q_proj', 'v_proj'], or a regular expression"
    )
