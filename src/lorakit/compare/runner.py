"""Run the (method, seed) experiments of a comparison, each as its own `lorakit train` process.

A separate process per run gives each its own peak-memory figure and keeps one failure from ending the rest.
Every run ends with a status: "ok" (summary.json written), "diverged" (the child stopped on a non-finite loss,
exit code `TrainingDiverged.exit_code`) or "failed" (any other exit: a user error, exit 2, or a crash), with the
child's one-line error. Runs are resumable: a finished or diverged run is skipped, one with checkpoints continues
with --resume, a failed one starts again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..atomic import write_json
from ..training.checkpoint import checkpoint_dirs
from ..training.loop import TrainingDiverged
from ..training.run_config import TrainConfig
from .spec import MethodSpec

DIVERGED_EXIT = TrainingDiverged.exit_code
DIVERGED_MARKER = "diverged.json"  # in a diverged run's directory: a resumed compare does not train it again
ERROR_LINE = re.compile(r"lorakit(?: [a-z]+)?: ((?:internal )?error: .*)")


def run_one(cfg: TrainConfig, label: str) -> dict:
    """Train (or resume, or skip if done) one run; returns its outcome, read back from disk."""
    out = Path(cfg.out)
    if (out / "summary.json").is_file():
        return _finished(out)
    if (out / DIVERGED_MARKER).is_file():
        return {**json.loads((out / DIVERGED_MARKER).read_text()), **read_curves(out)}
    resume = bool(checkpoint_dirs(out)) and (out / "run.json").is_file()
    if out.exists() and not resume:
        shutil.rmtree(out)  # an interrupted or failed run without checkpoint starts over
    cfg = dataclasses.replace(cfg, resume=resume)
    print(f"lorakit compare: {label} seed {cfg.seed} lr {cfg.lr:g}{' (resumed)' if resume else ''}", flush=True)
    code, stderr_tail = run_teeing_stderr([sys.executable, "-m", "lorakit", "train", *cfg.to_argv()])
    if code == 0 and (out / "summary.json").is_file():
        return _finished(out)
    if code in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    status = "diverged" if code == DIVERGED_EXIT else "failed"
    outcome = {"status": status, "diverged": status == "diverged", "error": error_line(stderr_tail, code)}
    outcome["exit_code"] = code
    print(f"lorakit compare: {label} seed {cfg.seed} {status}: {outcome['error']}", flush=True)
    if status == "diverged" and out.is_dir():
        write_json(out / DIVERGED_MARKER, outcome)
    return {**outcome, **read_curves(out)}


def _finished(out: Path) -> dict:
    return {"status": "ok", "diverged": False, **json.loads((out / "summary.json").read_text()), **read_curves(out)}


def run_teeing_stderr(command: list[str], keep: int = 1 << 16) -> tuple[int, str]:
    """Run `command`; its stdout goes to ours, its stderr is copied to ours as it comes (progress bars included)
    and its last `keep` bytes are returned with the exit code."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE)
    sink = getattr(sys.stderr, "buffer", None)
    tail = b""
    try:
        while chunk := os.read(proc.stderr.fileno(), 4096):
            tail = (tail + chunk)[-keep:]
            if sink is not None:
                sink.write(chunk)
                sink.flush()
            else:  # a replaced sys.stderr (tests capturing output) takes text
                sys.stderr.write(chunk.decode(errors="replace"))
    finally:
        proc.stderr.close()
        code = proc.wait()
    return code, tail.decode(errors="replace")


def error_line(stderr: str, code: int) -> str:
    """The child's one-line error: its last `lorakit: error:` line, else its last line, else how it ended."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    for line in reversed(lines):
        match = ERROR_LINE.match(line)
        if match:
            return match[1].removeprefix("error: ")
    if code < 0:
        return (
            f"killed by signal {signal.Signals(-code).name}"
            if -code in signal.valid_signals()
            else f"killed by signal {-code}"
        )
    return f"exit code {code}" + (f": {lines[-1][:300]}" if lines else "")


def read_curves(out: Path) -> dict:
    log = out / "log.jsonl"
    lines = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.is_file() else []
    return {
        "train_curve": [[l["step"], l["loss"]] for l in lines if "loss" in l],
        "eval_curve": [[l["step"], l["eval_loss"]] for l in lines if "eval_loss" in l],
    }


def final_loss(outcome: dict) -> float | None:
    """The final (eval, else smoothed train) loss of a finished run; None for a diverged or failed run, or a
    non-finite loss (which the aggregates must never see)."""
    if outcome.get("status", "diverged" if outcome.get("diverged") else "ok") != "ok":
        return None
    value = outcome.get("final_eval_loss")
    if value is None:  # no eval data: the mean of the last tenth of the train curve
        curve = [loss for _, loss in outcome.get("train_curve") or []]
        if not curve:
            return None
        tail = curve[-max(1, len(curve) // 10) :]
        value = sum(tail) / len(tail)
    return value if math.isfinite(value) else None


def sweep_learning_rate(
    base: TrainConfig, spec: MethodSpec, rates: list[float], steps: int, root: Path
) -> tuple[float, dict]:
    """Short runs at each rate with the first seed; returns (best rate, {rate: final loss, or "diverged" /
    "failed"}). If no rate finished, the lowest rate is used (the runs then report what happens)."""
    losses: dict[str, float | str] = {}
    for lr in rates:
        cfg = dataclasses.replace(
            base,
            **{**spec.overrides, "lr": lr},
            method=spec.method,
            steps=steps,
            out=str(root / spec.slug / f"lr-{lr:g}"),
            save_every=0,
        )
        outcome = run_one(cfg, f"{spec.label} (lr sweep)")
        loss = final_loss(outcome)
        losses[f"{lr:g}"] = (
            loss if loss is not None else ("failed" if outcome.get("status") == "failed" else "diverged")
        )
    finished = [lr for lr in rates if not isinstance(losses[f"{lr:g}"], str)]
    best = min(finished, key=lambda lr: losses[f"{lr:g}"]) if finished else min(rates)
    return best, losses
