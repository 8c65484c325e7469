"""Run the (method, seed) experiments of a comparison, each as its own `lorakit train` process.

A separate process per run gives each its own peak-memory figure and keeps one failure from ending the rest.
Runs are resumable: a run with summary.json is skipped, one with checkpoints continues with --resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import LorakitError
from ..training.checkpoint import checkpoint_dirs
from ..training.run_config import TrainConfig
from .spec import MethodSpec

DIVERGED_EXIT = 1


def run_one(cfg: TrainConfig, label: str) -> dict:
    """Train (or resume, or skip if done) one run; returns its outcome read back from disk."""
    out = Path(cfg.out)
    if not (out / "summary.json").is_file():
        resume = bool(checkpoint_dirs(out)) and (out / "run.json").is_file()
        if out.exists() and not resume:
            shutil.rmtree(out)  # an interrupted run without checkpoint starts over
        cfg = dataclasses.replace(cfg, resume=resume)
        print(f"lorakit compare: {label} seed {cfg.seed} lr {cfg.lr:g}{' (resumed)' if resume else ''}", flush=True)
        # the child's progress bar and messages go straight to the terminal
        result = subprocess.run([sys.executable, "-m", "lorakit", "train", *cfg.to_argv()])
        if result.returncode not in (0, DIVERGED_EXIT):
            raise LorakitError(
                f"run {label} seed {cfg.seed} failed (exit code {result.returncode}, message above); "
                "fix it and run the same compare command again to resume"
            )
        if result.returncode == DIVERGED_EXIT:
            return {"diverged": True, **read_curves(out)}
    return {"diverged": False, **json.loads((out / "summary.json").read_text()), **read_curves(out)}


def read_curves(out: Path) -> dict:
    log = out / "log.jsonl"
    lines = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.is_file() else []
    return {
        "train_curve": [[l["step"], l["loss"]] for l in lines if "loss" in l],
        "eval_curve": [[l["step"], l["eval_loss"]] for l in lines if "eval_loss" in l],
    }


def final_loss(outcome: dict) -> float:
    if outcome.get("diverged"):
        return math.inf
    value = outcome.get("final_eval_loss")
    if value is None:  # no eval data: the mean of the last tenth of the train curve
        curve = [loss for _, loss in outcome["train_curve"]]
        tail = curve[-max(1, len(curve) // 10) :]
        value = sum(tail) / len(tail)
    return value if math.isfinite(value) else math.inf


def sweep_learning_rate(
    base: TrainConfig, spec: MethodSpec, rates: list[float], steps: int, root: Path
) -> tuple[float, dict]:
    """Short runs at each rate with the first seed; returns (best rate, {rate: final loss})."""
    losses = {}
    for lr in rates:
        cfg = dataclasses.replace(
            base,
            **{**spec.overrides, "lr": lr},
            method=spec.method,
            steps=steps,
            out=str(root / spec.slug / f"lr-{lr:g}"),
            save_every=0,
        )
        losses[f"{lr:g}"] = final_loss(run_one(cfg, f"{spec.label} (lr sweep)"))
    best = min(rates, key=lambda lr: losses[f"{lr:g}"])
    return best, losses
