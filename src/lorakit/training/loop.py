"""The training run: one process, DDP on Accelerate (devices, mixed precision), or FSDP2 with `--fsdp`.

Loss is the mean next-token cross-entropy over the labelled tokens of the whole global batch (all processes and
accumulation micro-batches), so 2 processes × batch B train exactly like 1 process × batch 2B and gradient
accumulation is exact. Checkpoints hold the adapter, optimizer, scheduler, every process's RNG and the step, never
the frozen base. How processes share the work is in `distributed.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from pathlib import Path

import torch

from .. import __version__
from ..atomic import prepare_directory, write_json
from ..data import default_eval_source, load_examples, read_records
from ..data.formats import IGNORE
from ..errors import BaseModelMismatchError, ConfigError, LorakitError
from ..inject import DEFAULT_ADAPTER, adapt, adapter_layers, set_active, trainable_parameters
from ..models import load_model
from ..persist import load_adapter, read_adapter, save_adapter
from ..procedures.base import TrainingState
from ..quantize import model_quantization, quantize_model
from ..recompute import recompute_adapter_inputs
from ..token_rows import TOKENIZER_DIR, add_tokens
from . import classification
from . import rng as train_rng
from .batches import collate, global_batch, micro_batch, trained_tokens
from .checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from .distributed import local_base_elements, make_runtime
from .evaluate import evaluate_loss
from .loss import token_loss_sum
from .rng import seed_process
from .run_config import TrainConfig, flags_in_message, parse_names

SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


class TrainingDiverged(LorakitError):
    """The loss became non-finite; the run stopped and kept its last good checkpoint."""

    exit_code = 3  # its own code: `lorakit compare` tells a diverged run (a result) from a failed one


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


def _pad_for_processes(examples: list[dict], processes: int) -> list[dict]:
    """Under FSDP every process must run the same number of forward passes (each one gathers parameters): pad the
    eval set to a multiple of `processes` with copies whose labels are all ignored (no loss, no tokens)."""
    missing = -len(examples) % processes
    filler = {"input_ids": examples[0]["input_ids"], "labels": [IGNORE] * len(examples[0]["input_ids"])}
    return examples + [filler] * missing


def train(cfg: TrainConfig) -> dict:
    """Run a fine-tune as configured; returns the summary also written to DIR/summary.json."""
    cfg.validate()
    out = Path(cfg.out)
    resume_from = _prepare_run_dir(cfg, out)
    runtime = make_runtime(cfg.precision, cfg.fsdp)
    try:
        return _train(cfg, out, resume_from, runtime)
    finally:
        runtime.close()


def _train(cfg: TrainConfig, out: Path, resume_from: Path | None, runtime) -> dict:
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    main = runtime.is_main_process
    world, rank = runtime.num_processes, runtime.process_index
    torch.manual_seed(cfg.seed)  # the same on every process while the model is built
    for source in filter(None, (cfg.data, cfg.eval_data)):
        read_records(source)  # fail fast on a missing or broken file, before the model loads
    frozen = cfg.frozen_adapter or []
    for path in frozen:
        read_adapter(path)  # the same for the frozen adapters
    classify = cfg.task == "classification"
    labels = classification.labels_of(read_records(cfg.data), cfg.data) if classify else None
    base, tokenizer = load_model(
        cfg.model, trust_remote_code=cfg.trust_remote_code, num_labels=len(labels) if classify else None
    )
    new_token_ids = add_tokens(base, tokenizer, parse_names(cfg.add_tokens)) if cfg.add_tokens else None
    if cfg.quantize:
        quantize_model(base, cfg.quantize)  # before the adapters: they read the quantized weights
    examples, data_format = _load_data(cfg.data, tokenizer, cfg.max_length, labels)
    eval_source = cfg.eval_data or default_eval_source(cfg.data)  # a built-in dataset's own eval split
    eval_examples = None
    if eval_source:
        eval_examples, _ = _load_data(eval_source, tokenizer, cfg.max_length, labels, split="eval")
        if cfg.eval_limit:
            eval_examples = eval_examples[: cfg.eval_limit]
    try:
        # On the whole model, before any sharding: OLoRA and LoRA-Mini "qr" factor full weights, and the base
        # fingerprints (taken when the adapter layers are built) are those of full weights.
        procedure = _make_procedure(cfg)  # its options and the model it must train are checked before anything is written
        adapter_config = procedure.adapter_config(cfg.adapter_config()) if procedure else cfg.adapter_config()
        if new_token_ids:  # --add-tokens: only their rows train
            adapter_config = dataclasses.replace(adapter_config, trainable_tokens=new_token_ids)
        if classify:  # the new head trains in full
            saved = [classification.head_name(base)] + (adapter_config.modules_to_save or [])
            adapter_config = dataclasses.replace(adapter_config, modules_to_save=list(dict.fromkeys(saved)))
        model = _load_frozen(base, frozen)
        trained = DEFAULT_ADAPTER if frozen else None  # the new adapter's name beside the frozen ones
        if resume_from:
            model = load_adapter(model, resume_from, name=trained)
        else:
            model = adapt(model, adapter_config, name=trained)
        if frozen:  # all active, only the new one trains
            set_active(model, [*_frozen_names(frozen), DEFAULT_ADAPTER], train=DEFAULT_ADAPTER)
    except ConfigError as exc:
        raise ConfigError(flags_in_message(str(exc))) from None
    try:
        if procedure is not None:
            procedure.check(model)
        if cfg.optimizer == "rite":
            from ..optim.rite import factor_pairs

            factor_pairs(model)  # refuses methods without an (A, B) pair per layer
    except ConfigError as exc:
        raise ConfigError(flags_in_message(str(exc))) from None
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    elif not cfg.fsdp:  # the adapters' norm and product inputs made again in backward, not kept (lorakit.recompute)
        recompute_adapter_inputs(model)
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.base_fingerprint  # noqa: B018 - make sure it is taken from the full weight, before sharding
    base_memory = model_quantization(model)  # {"quantization", "base_bytes_per_parameter"}, before sharding
    trainable = sum(p.numel() for p in trainable_parameters(model))  # shared tensors (LoRTA) included, once
    base_parameters = sum(p.numel() for p in model.parameters() if not p.requires_grad)

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
    runtime.wait_for_everyone()

    model = runtime.shard(model)  # FSDP: parameters become DTensor shards; otherwise unchanged
    if eval_examples and runtime.strategy == "fsdp":
        eval_examples = _pad_for_processes(eval_examples, world)
    optimizer = _make_optimizer(cfg, model)
    scheduler = get_scheduler(
        SCHEDULER_NAMES[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps
    )
    # Dropout masks: every process its own stream (seeded from seed and rank), restored per process on resume.
    seed_process(cfg.seed, rank)
    start_step, elapsed_before = 0, 0.0
    if resume_from:
        state = load_checkpoint(resume_from, optimizer, scheduler, rank=rank, processes=world)
        start_step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        if procedure is not None:
            procedure.load_state_dict(state.get("procedure") or {}, state["procedure_tensors"], model)
    model, optimizer = runtime.prepare(model, optimizer)
    moment = TrainingState(runtime.unwrap(model), optimizer, scheduler, start_step, cfg.steps, cfg.seed, rank, world)
    if procedure is not None:
        procedure.on_train_begin(moment)
    device = runtime.device
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
    evaluate = classification.evaluate if classify else evaluate_loss
    collate_batch = classification.collate if classify else collate
    counted = (lambda example: 1) if classify else trained_tokens  # what the loss is a mean over
    if eval_examples and cfg.eval_every and start_step == 0:  # where every method starts from
        log.write({"step": 0, **evaluate(model, eval_examples, cfg.batch_size, pad_id, device, runtime)})
    try:
        for step in range(start_step, cfg.steps):
            step_start = time.perf_counter()
            indices = global_batch(len(examples), step, global_size, cfg.seed)
            global_tokens = sum(counted(examples[i]) for i in indices)
            step_tokens = sum(len(examples[i]["input_ids"]) for i in indices)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            moment.step = step
            if procedure is not None:
                procedure.before_step(moment)
            for k in range(cfg.grad_accum):
                chosen = micro_batch(indices, k, rank, cfg.batch_size, world)
                batch = collate_batch([examples[i] for i in chosen], pad_id)
                batch = {key: v.to(device) for key, v in batch.items()}
                with runtime.gradient_sync(model, k == cfg.grad_accum - 1), runtime.autocast():
                    if classify:
                        loss = classification.loss_sum(model, batch)
                    else:
                        loss = token_loss_sum(model, batch, full_logits=cfg.full_logits)
                    # DDP and FSDP average gradients over processes: scale by `world` so the result is the global mean
                    runtime.backward(loss * (world / max(global_tokens, 1)))
                loss_sum += loss.detach().double()
            if world > 1:
                loss_sum = runtime.reduce(loss_sum, reduction="sum")
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
            if procedure is not None:
                runtime.unscale_gradients(optimizer)  # fp16: the procedure sees true gradients, as in the Trainer
                procedure.after_backward(moment)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step applies: a procedure may rescale the
            # scheduler's (Chain of LoRA's rewarm), so get_last_lr() is not it
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if procedure is not None:
                procedure.after_optimizer_step(moment)
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
                record.update(evaluate(model, eval_examples, cfg.batch_size, pad_id, device, runtime))
            log.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and not is_last:
                saved = _save_checkpoint(
                    runtime, out, model, optimizer, scheduler, step + 1, {"elapsed_s": record["elapsed_s"]}, cfg, procedure
                )
                last_checkpoint = saved or last_checkpoint
    finally:
        bar.close()
        log.close()
    wall = elapsed_before + time.perf_counter() - started
    runtime.wait_for_everyone()
    peaks = runtime.gather_object(_peak_memory_bytes(device))
    runtime.reshard(model)
    local_base = runtime.gather_object(local_base_elements(model))
    summary = {}
    with runtime.full_adapter(model) as full:  # a collective under FSDP: every process gathers, process 0 writes
        if main:  # a procedure may save other layers (Chain of LoRA: all links as one LoRA)
            adapter_dir = save_adapter(full, out / "adapter", layers=procedure and procedure.layers_to_save(full))
            if cfg.add_tokens:  # eval / generate read the adapter with the tokenizer that knows its tokens
                tokenizer.save_pretrained(adapter_dir / TOKENIZER_DIR)
            if classify:  # eval builds the classifier with these labels
                classification.save_labels(adapter_dir, labels)
    if main:
        summary = {
            "method": cfg.method,
            "rank": cfg.rank,
            "steps": cfg.steps,
            "seed": cfg.seed,
            "final_train_loss": record.get("loss"),
            "final_eval_loss": record.get("eval_loss"),
            "final_eval_perplexity": record.get("eval_perplexity"),
            "task": cfg.task,
            "accuracy": record.get("accuracy"),  # --task classification, with eval data
            "trainable_parameters": trainable,
            "adapter_bytes": (adapter_dir / "adapter.safetensors").stat().st_size,
            "wall_time_s": wall,
            "tokens_per_s": tokens_total / max(time.perf_counter() - started, 1e-9),
            "peak_memory_bytes": peaks[0],
            "peak_memory_bytes_per_process": peaks,
            "processes": world,
            "strategy": runtime.strategy,
            "procedure": procedure.describe() if procedure is not None else None,
            "procedure_report": procedure.report() if procedure is not None else None,
            "optimizer": cfg.optimizer,
            "precision": runtime.precision_details,
            **base_memory,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "frozen_adapters": [str(Path(path).resolve()) for path in frozen],  # active under the trained one
            "base_parameters": base_parameters,
            "base_parameters_per_process": local_base,
        }
        write_json(out / "summary.json", summary)
    runtime.wait_for_everyone()
    return summary


def _frozen_names(frozen: list[str]) -> list[str]:
    return [f"frozen_{i}" for i in range(1, len(frozen) + 1)]


def _load_frozen(base, frozen: list[str]):
    """--frozen-adapter: each adapter loaded onto the base in turn (the base check applies to each)."""
    model = base
    for path, name in zip(frozen, _frozen_names(frozen), strict=True):
        try:
            model = load_adapter(model, path, name=name)
        except BaseModelMismatchError as exc:  # its fix names load_adapter's strict=, which train does not have
            raise BaseModelMismatchError(
                f"--frozen-adapter {path}: {exc.problem}", "train on the base model it was trained on (--model)"
            ) from None
    return model


def enable_gradient_checkpointing(model) -> None:
    """transformers' non-reentrant activation checkpointing of every decoder block: each block keeps its input
    only and recomputes its activations in backward (with the RNG state of the forward, so dropout masks repeat)."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable) or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing; "
            "train without it"
        )
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _load_data(source: str, tokenizer, max_length: int, labels: list[str] | None, split: str = "train"):
    """(examples, format): token-level examples, or with `labels` (--task classification) one label per text."""
    if labels is None:
        return load_examples(source, tokenizer, max_length, split=split)
    records = read_records(source, split=split)
    return classification.tokenize(records, tokenizer, max_length, labels, source), "classification"


def _make_optimizer(cfg: TrainConfig, model):
    if cfg.optimizer == "rite":
        from ..optim import LoraRite

        try:
            return LoraRite(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except ConfigError as exc:
            raise ConfigError(flags_in_message(str(exc))) from None
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_procedure(cfg: TrainConfig):
    if cfg.procedure is None:
        return None
    from ..procedures import PROCEDURES, parse_procedure

    name, options = parse_procedure(cfg.procedure)
    return PROCEDURES[name](options)


def _save_checkpoint(runtime, out, model, optimizer, scheduler, step, extra, cfg, procedure) -> Path | None:
    """Every process takes part (RNG states and, under FSDP, full tensors are gathered); process 0 writes."""
    runtime.wait_for_everyone()
    rng_states = runtime.gather_object(train_rng.capture())
    optimizer_state = runtime.optimizer_state(optimizer)
    saved = None
    with runtime.full_adapter(model) as full:
        if runtime.is_main_process:
            saved = save_checkpoint(
                out,
                full,
                optimizer,
                scheduler,
                step,
                {**extra, "procedure": procedure.state_dict()} if procedure is not None else extra,
                cfg.keep_checkpoints,
                rng_states=rng_states,
                optimizer_state=optimizer_state,
                procedure_tensors=procedure.state_tensors(full) if procedure is not None else None,
            )
    runtime.wait_for_everyone()
    return saved
