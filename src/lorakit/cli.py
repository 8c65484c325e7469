"""The `lorakit` command: argument parsing and error reporting. The work is done in `lorakit.commands`.

Every user error prints one line `lorakit: error: <problem>; <fix>` on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import LorakitError
from .methods import METHODS
from .models import DEFAULT_MODEL
from .procedures import PROCEDURES
from .training.run_config import OPTIMIZERS, PRECISIONS, REPORTERS, SCHEDULES, TASKS, TrainConfig

PACKAGE_DIR = Path(__file__).resolve().parent

DEFAULTS = TrainConfig()


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_model(p, required=False, adapter=False):
    p.add_argument(
        "--model",
        default=None if required else DEFAULT_MODEL,
        required=required,
        help=f"transformers model directory, .gguf file, hub id, or the built-in {DEFAULT_MODEL}",
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model's repository")
    if adapter:
        p.add_argument(
            "--no-strict",
            dest="strict",
            action="store_false",
            help="apply the adapter even if the base weights differ from those it was trained on (a warning)",
        )


def add_train_arguments(p, *, compare: bool = False) -> None:
    d = DEFAULTS
    _add_model(p)
    p.add_argument(
        "--data",
        default=d.data,
        help="JSONL/JSON/CSV/Parquet/TXT file, hub dataset, or a built-in source: stdlib-docstrings, "
        "manpages-summaries, uuid-pairs[:n=N,seed=S]",
    )
    p.add_argument(
        "--eval-data",
        default=None,
        help="evaluation data (default: the eval split of stdlib-docstrings when training on it)",
    )
    p.add_argument(
        "--task",
        default=d.task,
        choices=TASKS,
        help="causal-lm, or classification: `text` / `label` records, a sequence classifier whose new head trains "
        "in full; eval reports accuracy",
    )
    if not compare:
        p.add_argument("--method", default=d.method, help=f"one of: {', '.join(sorted(METHODS))}")
    p.add_argument("--rank", type=int, default=d.rank, help="adapter rank r (LoRA-Mini: inner rank)")
    p.add_argument(
        "--alpha", type=float, default=None, help="scale numerator; scale = alpha/rank (default alpha = rank)"
    )
    p.add_argument("--targets", default=d.targets, help="'all-linear', comma-separated module suffixes, or re:<regex>")
    p.add_argument(
        "--modules-to-save",
        default=None,
        metavar="NAME[,NAME]",
        help="module-name suffixes trained in full beside the adapters (e.g. lm_head, score); saved in the adapter",
    )
    p.add_argument(
        "--target-parameters",
        default=None,
        metavar="NAME[,NAME]",
        help="3-D expert parameters of mixture-of-experts layers (e.g. experts.gate_up_proj,experts.down_proj) that "
        "get a LoRA per expert beside --targets (method lora; PEFT's target_parameters)",
    )
    p.add_argument(
        "--add-tokens",
        default=None,
        metavar="TOK[,TOK]",
        help="add these tokens to the tokenizer, resize the embeddings and train only their rows; the tokenizer is "
        "saved in DIR/adapter/tokenizer",
    )
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the adapter input")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    p.add_argument("--init", default=d.init, help="kaiming or gaussian init of the random trained factor")
    p.add_argument("--mini-a", type=int, default=d.mini_a, help="LoRA-Mini outer rank of A_out")
    p.add_argument("--mini-b", type=int, default=d.mini_b, help="LoRA-Mini outer rank of B_out")
    p.add_argument(
        "--mini-outer", default=d.mini_outer, help="LoRA-Mini frozen outer matrices: orthonormal, normal or qr"
    )
    if not compare:
        p.add_argument(
            "--option",
            action="append",
            metavar="KEY=VALUE",
            help="a method option, repeatable (melora: blocks=4; mora: kind=sharing; see README, The methods)",
        )
    if not compare:
        p.add_argument(
            "--procedure",
            default=None,
            metavar="NAME[:key=value,...]",
            help=f"a training procedure, one of: {', '.join(sorted(PROCEDURES))} (e.g. flat:rho=0.05, cola:links=3); "
            "see README, Training procedures",
        )
        p.add_argument(
            "--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="adamw, or rite (LoRA-RITE, lorakit.optim)"
        )
        p.add_argument(
            "--frozen-adapter",
            action="append",
            metavar="DIR",
            help="an adapter loaded first and kept frozen, repeatable: the new adapter trains on top of these (all "
            "active); DIR/adapter holds the new one only, so evaluate with lorakit eval --adapter DIR ... --adapter "
            "OUT/adapter",
        )
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per process and micro-batch")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument(
        "--max-length", type=int, default=d.max_length, help="tokens per example (longer ones are truncated)"
    )
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="learning-rate schedule after warm-up")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every E steps (0: only at the end)")
    p.add_argument(
        "--eval-limit", type=int, default=d.eval_limit, help="evaluate on the first N eval examples (0: all)"
    )
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every K steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept on disk")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument(
        "--report-to", default=d.report_to, choices=REPORTERS, help="also log to TensorBoard (DIR/tensorboard)"
    )
    p.add_argument(
        "--precision",
        default=d.precision,
        choices=PRECISIONS,
        help="mixed precision (Accelerate autocast; with --fsdp: FSDP2 bf16 parameters, float32 reduction)",
    )
    if not compare:
        p.add_argument(
            "--fsdp",
            action="store_true",
            help="shard base and adapter over the processes with PyTorch FSDP2; launch with torchrun --nproc_per_node N",
        )
    p.add_argument(
        "--quantize",
        default=None,
        choices=("nf4", "fp4", "int8", "torchao-nf4"),
        help="quantize the base's linear layers with bitsandbytes (QLoRA: nf4), or torchao's NF4 (torchao-nf4); the "
        "adapters train on top",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each block's activations in backward: less memory, one more forward pass per step",
    )
    p.add_argument(
        "--full-logits",
        action="store_true",
        help="keep the whole logits for backward (default: a fused loss that keeps only their gradient)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if not compare:
        p.add_argument("--seed", type=int, default=d.seed, help="seed of data order and adapter init")
    p.add_argument("--out", required=True, help="output directory")


def build_parser() -> Parser:
    parser = Parser(
        prog="lorakit",
        formatter_class=Formatter,
        description="Fine-tune language models with LoRA, OLoRA, LoRA-Mini and related methods; compare them side by side.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=Formatter)

    add_train_arguments(
        command("train", "fine-tune a model with one method; writes DIR/adapter, log.jsonl, checkpoints")
    )

    p = command("eval", "evaluate an adapter: loss, perplexity, and exact match for instruction data")
    _add_model(p, adapter=True)
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        metavar="DIR",
        help="adapter directory (omit to evaluate the base model); repeat to evaluate several active together, "
        "their updates added (an adapter trained with --frozen-adapter: give those first)",
    )
    p.add_argument("--data", required=True, help="evaluation data (file, hub dataset or stdlib-docstrings)")
    p.add_argument("--max-length", type=int, default=DEFAULTS.max_length, help="tokens per example")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="examples per forward pass")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N examples (0: all)")
    p.add_argument(
        "--exact-match", type=int, default=16, help="generate for the first N instruction examples (0: skip)"
    )

    p = command("generate", "generate greedy completions: one prompt, or a file of prompts with an adapter each")
    _add_model(p, adapter=True)
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        metavar="[NAME=]DIR",
        help="adapter directory; repeat as NAME=DIR to serve several adapters on one base (a mixed batch)",
    )
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the user prompt")
    prompts.add_argument(
        "--prompts",
        metavar="FILE",
        help='JSONL, one {"adapter": NAME, "prompt": TEXT} per line ("base": no adapter); all in one batch',
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")

    p = command("merge", "fold an adapter into the base weights and save a full transformers model")
    _add_model(p, adapter=True)
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="new directory for the merged model")

    p = command("export", "export an adapter to another format (PEFT LoRA: loadable by PEFT, vLLM, TGI)")
    _add_model(p, adapter=True)
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--format", default="peft", help="peft")
    p.add_argument("--out", required=True, help="new directory for the exported adapter")

    p = command("inspect", "show an adapter's method, config, parameters, file size and base fingerprint")
    p.add_argument("adapter", help="adapter directory")

    p = command("compare", "train several methods over several seeds and write a side-by-side report")
    p.add_argument(
        "--methods",
        default="lora,olora,mini",
        help="comma-separated methods; variants inline, e.g. mini:outer=normal:lr=3e-5, lora:r=4",
    )
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    p.add_argument(
        "--lr-sweep",
        default=None,
        help="'auto' (each method's own grid, centred on its documented rate) or comma-separated rates tried per "
        "method on a short budget; a best rate at an end of the grid extends it x3, up to 3 times",
    )
    p.add_argument(
        "--exact-match",
        type=int,
        default=None,
        help="greedy exact match on the first N eval examples after each run (default: 64 for uuid-pairs, else none)",
    )
    p.add_argument("--sweep-steps", type=int, default=0, help="steps per sweep run (default: a quarter of --steps)")
    p.add_argument("--target-loss", type=float, default=None, help="report steps needed to reach this eval/train loss")
    p.add_argument("--log-scale", action="store_true", help="log-scale loss axis in loss.png")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write results.json, report.md and the plots from the runs already on disk, training nothing "
        "(unfinished runs are reported as pending); the other flags must be the comparison's own",
    )
    p.add_argument(
        "--reuse",
        action="append",
        metavar="RESULTS_JSON",
        help="an earlier comparison's results.json (repeatable): its finished runs and sweeps of the same setting "
        "stand in for training them (when the run directories are gone); the rest is trained",
    )
    p.add_argument(
        "--note",
        default=None,
        help="a paragraph printed at the top of report.md (and kept in results.json), e.g. where the missing runs are",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="the built-in demo: default model and data, a budget for about 9 min on 2 CPU cores",
    )
    add_train_arguments(p, compare=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # which flags were given explicitly (compare --demo fills in the others)
    try:
        from . import commands

        _quiet_libraries()
        return getattr(commands, f"run_{args.command}")(args) or 0
    except LorakitError as exc:
        print(f"lorakit: error: {_one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("lorakit: interrupted; a run with --save-every continues with --resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug (or an unforeseen bad input): one line, the traceback on request
        if os.environ.get("LORAKIT_DEBUG", "") not in ("", "0"):
            raise
        print(internal_error_line(exc), file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())  # one line, always
    return text or type(exc).__name__


def internal_error_line(exc: BaseException) -> str:
    """What main() prints for an unexpected exception instead of a traceback."""
    message = _one_line(exc)
    if len(message) > 300:
        message = message[:297] + "..."
    return (
        f"lorakit: internal error: {type(exc).__name__}: {message}; "
        "re-run with LORAKIT_DEBUG=1 for the full traceback and report it"
    )


def _quiet_libraries() -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    default_format = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        """lorakit's own warnings as one line, like its errors; other libraries' keep their format."""
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            return f"lorakit: warning: {_one_line(message)}\n"
        return default_format(message, category, filename, lineno, line)

    warnings.formatwarning = one_line


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
