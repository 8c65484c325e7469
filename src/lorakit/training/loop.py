"""The training run, on Accelerate (devices, DDP / FSDP processes, mixed precision).

Loss is the mean next-token cross-entropy over the labelled tokens of the whole global batch (all processes and
accumulation micro-batches), so 2 processes × batch B train exactly like 1 process × batch 2B and gradient
accumulation is exact. Checkpoints hold the adapter, optimizer, scheduler, RNG and step, never the frozen base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import time
from pathlib import Path

import torch

from .. import __version__
from ..atomic import prepare_directory, write_json
from ..data import load_examples, read_records
from ..data.stdlib_docstrings import NAME as DEFAULT_DATA
from ..errors import ConfigError, LorakitError
from ..inject import adapt, adapter_layers
from ..models import load_model
from ..persist import load_adapter, save_adapter
from .batches import collate, global_batch, micro_batch, token_loss_sum, trained_tokens
from .checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from .evaluate import evaluate_loss
from .run_config import TrainConfig, flags_in_message

SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


class TrainingDiverged(LorakitError):
    """The loss became non-finite; the run stopped and kept its last good checkpoint."""

    exit_code = 1


class RunLog:
    """DIR/log.jsonl (one line per optimizer step) and, optionally, TensorBoard."""

    def __init__(self, out: Path, resume_step: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run redoes the steps after its checkpoint: drop their lines
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "--report-to tensorboard needs the tensorboard package; pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _prepare_run_dir(cfg: TrainConfig, out: Path) -> Path | None:
    """Check --out / --resume against what is on disk; return the checkpoint to resume from (or None)."""
    run_file = out / "run.json"
    if cfg.resume:
        checkpoints = checkpoint_dirs(out)
        if not run_file.is_file() or not checkpoints:
            raise ConfigError(
                f"--resume: no checkpoint in {out / 'checkpoints'}; start without --resume (use --save-every N to write checkpoints)"
            )
        previous = json.loads(run_file.read_text())["config"]
        previous_cfg = TrainConfig(
            **{k: v for k, v in previous.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
        )
        changed = [k for k, v in cfg.comparable().items() if previous_cfg.comparable().get(k) != v]
        if changed:
            flag = "--" + changed[0].replace("_", "-")
            raise ConfigError(
                f"--resume: {flag} differs from the run in {out} ({previous_cfg.comparable()[changed[0]]!r}); use the same settings"
            )
        return checkpoints[-1]
    if run_file.exists():
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it or choose a new --out")
    return None


def _peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def train(cfg: TrainConfig) -> dict:
    """Run a fine-tune as configured; returns the summary also written to DIR/summary.json."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    cfg.validate()
    out = Path(cfg.out)
    resume_from = _prepare_run_dir(cfg, out)
    # cpu=True lets Accelerate run data-parallel over gloo when there is no GPU (torchrun on CPU)
    accelerator = Accelerator(mixed_precision=cfg.precision, cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    for source in filter(None, (cfg.data, cfg.eval_data)):
        read_records(source)  # fail fast on a missing or broken file, before the model loads
    base, tokenizer = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    examples, data_format = load_examples(cfg.data, tokenizer, cfg.max_length)
    eval_source = cfg.eval_data or (DEFAULT_DATA if cfg.data == DEFAULT_DATA else None)
    eval_examples = None
    if eval_source:
        eval_examples, _ = load_examples(eval_source, tokenizer, cfg.max_length, split="eval")
        if cfg.eval_limit:
            eval_examples = eval_examples[: cfg.eval_limit]
    try:
        model = load_adapter(base, resume_from) if resume_from else adapt(base, cfg.adapter_config())
    except ConfigError as exc:
        raise ConfigError(flags_in_message(str(exc))) from None
    layers = [layer for _, layer in adapter_layers(model)]
    trainable = sum(p.numel() for layer in layers for p in layer.trainable_parameters().values())

    if main:
        prepare_directory(out)
        if not resume_from:
            write_json(
                out / "run.json",
                {
                    "lorakit_version": __version__,
                    "config": dataclasses.asdict(cfg),
                    "data_format": data_format,
                    "train_examples": len(examples),
                    "eval_examples": len(eval_examples or []),
                    "trainable_parameters": trainable,
                },
            )
    accelerator.wait_for_everyone()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        SCHEDULER_NAMES[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps
    )
    start_step, elapsed_before = 0, 0.0
    if resume_from:
        state = load_checkpoint(resume_from, optimizer, scheduler)
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    global_size = cfg.batch_size * world * cfg.grad_accum
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    log = RunLog(out, start_step, cfg.report_to == "tensorboard", main)
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=not main or cfg.quiet,
        desc=f"{cfg.method} r={cfg.rank}",
        unit="step",
    )
    model.train()
    started, tokens_total = time.perf_counter(), 0
    last_checkpoint = checkpoint_dirs(out)[-1] if checkpoint_dirs(out) else None
    record: dict = {}
    if eval_examples and cfg.eval_every and start_step == 0:  # where every method starts from
        log.write({"step": 0, **evaluate_loss(model, eval_examples, cfg.batch_size, pad_id, device, accelerator)})
    try:
        for step in range(start_step, cfg.steps):
            step_start = time.perf_counter()
            indices = global_batch(len(examples), step, global_size, cfg.seed)
            global_tokens = sum(trained_tokens(examples[i]) for i in indices)
            step_tokens = sum(len(examples[i]["input_ids"]) for i in indices)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for k in range(cfg.grad_accum):
                chosen = micro_batch(indices, k, rank, cfg.batch_size, world)
                batch = {key: v.to(device) for key, v in collate([examples[i] for i in chosen], pad_id).items()}
                sync = contextlib.nullcontext() if k == cfg.grad_accum - 1 else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    loss = token_loss_sum(model, batch)
                    # DDP averages gradients over processes: scale by `world` so the result is the global mean
                    accelerator.backward(loss * (world / max(global_tokens, 1)))
                loss_sum += loss.detach().double()
            if world > 1:
                loss_sum = accelerator.reduce(loss_sum, reduction="sum")
            step_loss = (loss_sum / max(global_tokens, 1)).item()
            if not math.isfinite(step_loss):
                where = (
                    f"the last good checkpoint is {last_checkpoint}"
                    if last_checkpoint
                    else "no checkpoint was saved (use --save-every)"
                )
                raise TrainingDiverged(
                    f"non-finite loss ({step_loss}) at step {step + 1}; training stopped, {where}; lower --lr"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - step_start
            tokens_total += step_tokens
            record = {
                "step": step + 1,
                "loss": step_loss,
                "lr": lr,
                "tokens_per_s": step_tokens / max(seconds, 1e-9),
                "elapsed_s": elapsed_before + time.perf_counter() - started,
            }
            is_last = step + 1 == cfg.steps
            if eval_examples and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or is_last):
                record.update(evaluate_loss(model, eval_examples, cfg.batch_size, pad_id, device, accelerator))
            log.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and not is_last:
                accelerator.wait_for_everyone()
                if main:
                    last_checkpoint = save_checkpoint(
                        out,
                        accelerator.unwrap_model(model),
                        optimizer,
                        scheduler,
                        step + 1,
                        {"elapsed_s": record["elapsed_s"]},
                        cfg.keep_checkpoints,
                    )
                accelerator.wait_for_everyone()
    finally:
        bar.close()
        log.close()
    wall = elapsed_before + time.perf_counter() - started
    accelerator.wait_for_everyone()
    summary = {}
    if main:
        adapter_dir = save_adapter(accelerator.unwrap_model(model), out / "adapter")
        summary = {
            "method": cfg.method,
            "rank": cfg.rank,
            "steps": cfg.steps,
            "seed": cfg.seed,
            "final_train_loss": record.get("loss"),
            "final_eval_loss": record.get("eval_loss"),
            "final_eval_perplexity": record.get("eval_perplexity"),
            "trainable_parameters": trainable,
            "adapter_bytes": (adapter_dir / "adapter.safetensors").stat().st_size,
            "wall_time_s": wall,
            "tokens_per_s": tokens_total / max(time.perf_counter() - started, 1e-9),
            "peak_memory_bytes": _peak_memory_bytes(device),
            "processes": world,
        }
        write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
