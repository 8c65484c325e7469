"""`TrainConfig`: every setting of a training run, validated with messages that name the CLI flag and the fix."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import AdapterConfig
from ..data.stdlib_docstrings import NAME as DEFAULT_DATA
from ..errors import ConfigError
from ..models import DEFAULT_MODEL
from ..options import parse_option_strings

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")
REPORTERS = ("none", "tensorboard")
OPTIMIZERS = ("adamw", "rite")
TASKS = ("causal-lm", "classification")  # classification: `text` / `label` records (training/classification.py)
# Settings that may differ between a run and its --resume (everything else must match run.json).
RESUME_MAY_DIFFER = ("resume", "quiet", "report_to", "out")


@dataclass
class TrainConfig:
    out: str = "runs/train"
    task: str = "causal-lm"
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    eval_data: str | None = None
    method: str = "lora"
    rank: int = 16
    alpha: float | None = None
    targets: str = "all-linear"
    modules_to_save: str | None = None  # comma-separated module-name suffixes trained in full (lorakit.saved_modules)
    target_parameters: str | None = None  # comma-separated 3-D expert parameters with a LoRA per expert (expert_lora)
    add_tokens: str | None = None  # comma-separated tokens added to the tokenizer, their rows trained (token_rows)
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    mini_a: int = 32
    mini_b: int = 32
    mini_outer: str = "orthonormal"
    option: list[str] | None = None  # method options, "key=value" each (CLI: --option key=value, repeatable)
    procedure: str | None = None  # a training procedure, "NAME[:key=value,...]" (lorakit.procedures)
    frozen_adapter: list[str] | None = None  # adapter directories loaded first, active and frozen under the new one
    optimizer: str = "adamw"
    steps: int = 100
    batch_size: int = 4
    lr: float = 3e-4
    max_length: int = 256
    grad_accum: int = 1
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 0
    eval_limit: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    report_to: str = "none"
    precision: str = "no"
    fsdp: bool = False
    quantize: str | None = None  # quantize the loaded base: nf4, fp4, int8 (bitsandbytes) or torchao-nf4 (lorakit.quantize)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (transformers, non-reentrant)
    full_logits: bool = False  # keep the whole logits for backward instead of the fused loss (training/loss.py)
    trust_remote_code: bool = False
    quiet: bool = False

    def validate(self) -> None:
        positive_ints = {
            "steps": "optimizer steps",
            "batch_size": "examples per process and micro-batch",
            "max_length": "tokens per example",
            "grad_accum": "micro-batches per step",
            "keep_checkpoints": "checkpoints to keep",
        }
        for field, meaning in positive_ints.items():
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{_flag(field)} {value} is invalid; use a positive integer ({meaning})")
        for field in ("warmup", "eval_every", "eval_limit", "save_every", "seed"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{_flag(field)} {value} is invalid; use an integer >= 0")
        if not isinstance(self.lr, int | float) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"--lr {self.lr} is invalid; use a positive learning rate such as 3e-4")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"--weight-decay {self.weight_decay} is invalid; use a number >= 0")
        for field, choices in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("report_to", REPORTERS)):
            if getattr(self, field) not in choices:
                raise ConfigError(
                    f"{_flag(field)} {getattr(self, field)!r} is unknown; use one of: {', '.join(choices)}"
                )
        if self.task not in TASKS:
            raise ConfigError(f"--task {self.task!r} is unknown; use one of: {', '.join(TASKS)}")
        if self.task == "classification" and self.add_tokens:
            raise ConfigError("--add-tokens is for causal language models; drop it with --task classification")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer!r} is unknown; use one of: {', '.join(OPTIMIZERS)}")
        if self.procedure is not None:
            from ..procedures import PROCEDURES, parse_procedure

            name, options = parse_procedure(self.procedure)
            PROCEDURES[name](options)  # combinations of options are checked when the procedure is built
            if self.fsdp and not PROCEDURES[name].supports_fsdp:
                raise ConfigError(f"--procedure {name} does not support --fsdp yet; train it without --fsdp")
        if self.fsdp and self.optimizer != "adamw":
            raise ConfigError(f"--optimizer {self.optimizer} does not support --fsdp yet; use --optimizer adamw")
        if self.quantize is not None:
            from ..quantize import SCHEMES

            if self.quantize not in SCHEMES:
                raise ConfigError(f"--quantize {self.quantize!r} is unknown; use one of: {', '.join(SCHEMES)}")
            if self.fsdp:
                raise ConfigError(
                    "--quantize is not supported with --fsdp; drop --fsdp (torchrun without it runs DDP, which "
                    "supports --quantize) or drop --quantize"
                )
        if self.add_tokens is not None and not parse_names(self.add_tokens):
            raise ConfigError(
                f"--add-tokens {self.add_tokens!r} is invalid; give the new tokens separated by commas, such as "
                "'<tool>,</tool>'"
            )
        whole = [flag for flag, used in (("--modules-to-save", self.modules_to_save), ("--add-tokens", self.add_tokens),
                                         ("--target-parameters", self.target_parameters),
                                         ("--task classification", self.task == "classification")) if used]  # fmt: skip
        if self.fsdp and whole:  # full_adapter gathers the adapter layers' shards only
            raise ConfigError(
                f"{whole[0]} does not support --fsdp yet: the modules it trains are not gathered for saving; train "
                "without --fsdp (torchrun without it runs DDP)"
            )
        if self.frozen_adapter:
            _check_frozen_adapters(self)
        if self.fsdp and self.precision == "fp16":
            raise ConfigError("--precision fp16 is not supported with --fsdp; use --precision bf16")
        self.adapter_config()
        check_writable(Path(self.out))

    def adapter_config(self) -> AdapterConfig:
        try:
            return AdapterConfig(
                method=self.method,
                r=self.rank,
                alpha=self.alpha,
                targets=parse_targets(self.targets),
                dropout=self.dropout,
                rslora=self.rslora,
                init=self.init,
                seed=self.seed,
                mini_a=self.mini_a,
                mini_b=self.mini_b,
                mini_outer=self.mini_outer,
                extra=parse_option_strings(self.option),
                modules_to_save=parse_names(self.modules_to_save) if self.modules_to_save is not None else None,
                target_parameters=parse_names(self.target_parameters) if self.target_parameters is not None else None,
            )
        except ConfigError as exc:
            raise ConfigError(flags_in_message(str(exc))) from None

    def to_argv(self) -> list[str]:
        """The `lorakit train` flags that reproduce this config."""
        argv = []
        for key, value in dataclasses.asdict(self).items():
            if value is None or value is False:
                continue
            if isinstance(value, list):  # a repeatable flag
                argv += [part for item in value for part in (_flag(key), str(item))]
                continue
            argv += [_flag(key)] if value is True else [_flag(key), str(value)]
        return argv

    @classmethod
    def from_args(cls, args, **overrides) -> TrainConfig:
        """The config of parsed `lorakit train` / `lorakit compare` arguments (fields they lack keep defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values.update(overrides)
        return cls(**values)

    def comparable(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RESUME_MAY_DIFFER}


def _check_frozen_adapters(cfg: TrainConfig) -> None:
    """--frozen-adapter: the new adapter trains on top of these; what does not combine with it yet is refused."""
    beside = [flag for flag, used in (
        ("--procedure", cfg.procedure), ("--fsdp", cfg.fsdp), ("--optimizer rite", cfg.optimizer == "rite"),
        ("--task classification", cfg.task == "classification"), ("--add-tokens", cfg.add_tokens),
        ("--modules-to-save", cfg.modules_to_save), ("--target-parameters", cfg.target_parameters),
    ) if used]  # fmt: skip
    if beside:
        raise ConfigError(
            f"--frozen-adapter does not combine with {beside[0]} yet; train the new adapter without {beside[0]}"
        )
    seen = set()
    for path in cfg.frozen_adapter:
        key = Path(path).resolve()
        if key in seen:
            raise ConfigError(f"--frozen-adapter {path} is given twice; give each frozen adapter once")
        seen.add(key)


def parse_targets(value) -> str | list[str]:
    """CLI form: 'all-linear', comma-separated module-name suffixes, or 're:<regular expression>'."""
    if not isinstance(value, str):
        return value
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_names(value: str) -> list[str]:
    """CLI form of a list: comma-separated, blanks dropped."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


FLAG_NAMES = {
    "r": "--rank",
    "alpha": "--alpha",
    "mini_a": "--mini-a",
    "mini_b": "--mini-b",
    "mini_outer": "--mini-outer",
    "method": "--method",
    "init": "--init",
    "dropout": "--dropout",
    "targets": "--targets",
    "modules_to_save": "--modules-to-save",
    "target_parameters": "--target-parameters",
}


def flags_in_message(message: str) -> str:
    """Name config fields as the CLI flags the user typed: "r=0 is invalid" -> "--rank 0 is invalid"."""
    message = re.sub(r"^option (\S+) is unknown for method ", r"--option \1 is unknown for --method ", message)
    message = re.sub(r"^option (\S+) of (\w+) is invalid", r"--option \1 of --method \2 is invalid", message)
    for field, flag in FLAG_NAMES.items():
        message = re.sub(rf"(?<![\w-]){field}=", f"{flag} ", message)
        message = re.sub(rf"(?<=use ){field} <=", f"{flag} <=", message)
        message = re.sub(rf"^{field} ", f"{flag} ", message)
        message = re.sub(rf"(?<=drop ){field}\b", flag, message)
    return message


def check_writable(out: Path) -> None:
    """Refuse an --out that is a file or cannot be created, without creating anything."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file; choose a directory path")
        if not os.access(out, os.W_OK):
            raise ConfigError(f"--out {out} is not writable; choose a writable directory")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:  # a real probe: os.access says yes to root even where nothing can be created
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError:
        raise ConfigError(
            f"--out {out} cannot be created ({parent} is not a writable directory); choose another path"
        ) from None
