"""The training procedures' overhead against plain LoRA + AdamW on SmolLM2-135M (LoRA r=16 all-linear, fp32,
batch 4×256), in one process, the variants interleaved step by step (A B C A B C ...):

- Flat-LoRA: the noise generation alone (`before_step`'s σ from W + sΔW, then W + ε drawn for every adapted layer,
  into the procedure's reused buffers) against a plain LoRA step (goal ≤ 10%), the whole Flat-LoRA step (noise + the
  forward through W + ε) against a plain step (goal ≤ 1.10x), and the extra memory of the temporary weights (the adapted layers' W + ε kept for the backward:
  peak RSS of two steps in a child process each, against the adapted weights' size);
- LoRA-RITE: a whole training step against AdamW's (goal ≤ 1.3x; `bench_rite.py` has the optimizer step alone);
- Chain of LoRA: one knot (fold the link into the frozen factors, re-initialise the adapter, clear Adam's state)
  against a plain step (goal ≤ 1 step), and the step after the first knot (one more rank-r product per layer);
- XGBLoRA: one round end (fold the booster, draw the next round's blocks, re-initialise, clear the state) against a
  plain step (goal ≤ 1 step).

    python benchmarks/bench_procedures.py [repeats]
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import torch
from common import smollm2

import lorakit
from lorakit.optim import LoraRite
from lorakit.procedures.base import TrainingState
from lorakit.procedures.cola import ChainOfLora
from lorakit.procedures.flat import FlatLora
from lorakit.procedures.xgblora import XGBLora

BATCH, LENGTH, RANK, TOTAL = 4, 256, 16, 100
GOALS = {
    "flat_noise_over_step": 0.10,
    "flat_over_lora": 1.10,  # issue 28: the whole Flat-LoRA step at most 1.10x LoRA's
    "rite_over_adamw": 1.3,
    "cola_knot_over_step": 1.0,
    "xgblora_round_end_over_step": 1.0,
}


def adapted():
    return lorakit.adapt(smollm2(), lorakit.AdapterConfig(method="lora", r=RANK, alpha=RANK))


def batch():
    ids = torch.randint(0, 49152, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    return ids, ids.clone()


class Run:
    """One model, optimizer and procedure, stepped as the training loop steps them (hooks included)."""

    def __init__(self, procedure=None, optimizer: str = "adamw"):
        self.model = adapted()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = LoraRite(self.model, lr=1e-4) if optimizer == "rite" else torch.optim.AdamW(params, lr=1e-4)
        self.procedure = procedure
        self.step_index = TOTAL // 2  # mid-run: Flat-LoRA's f(t) = 1/2, not 0

    def state(self) -> TrainingState:
        return TrainingState(self.model, self.optimizer, None, self.step_index, TOTAL, seed=0)

    def step(self, ids, labels) -> None:
        if self.procedure is not None:
            self.procedure.before_step(self.state())
        self.model(input_ids=ids, labels=labels).loss.backward()
        if self.procedure is not None:
            self.procedure.after_backward(self.state())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def noise_generation(run: Run) -> float:
    """Seconds to make every adapted layer's W + ε once (σ in before_step, then the draw the forward makes)."""
    start = time.perf_counter()
    run.procedure.before_step(run.state())
    for _, layer in lorakit.adapter_layers(run.model):
        layer.weight_noise.perturbed(layer.base_weight_linear())
    run.procedure.after_backward(run.state())
    return time.perf_counter() - start


def step_overheads(repeats: int) -> dict:
    ids, labels = batch()
    runs = {"lora": Run(), "flat": Run(FlatLora({})), "rite": Run(optimizer="rite")}
    for run in runs.values():  # warm-up
        run.step(ids, labels)
    times = {name: [] for name in runs}
    flat_noise = []
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(lambda run=run: run.step(ids, labels)))
        flat_noise.append(noise_generation(runs["flat"]))
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(a, b))  # noqa: E731
    weights = sum(layer.base_layer.weight.numel() for _, layer in lorakit.adapter_layers(runs["flat"].model))
    return {
        "lora_step_s": statistics.median(times["lora"]),
        "flat_step_s": statistics.median(times["flat"]),
        "flat_noise_s": statistics.median(flat_noise),
        "flat_noise_over_step": ratio(flat_noise, times["lora"]),
        "flat_over_lora": ratio(times["flat"], times["lora"]),
        "adapted_weights_bytes": weights * 4,  # fp32: what one W + ε per adapted layer costs at most
        "rite_step_s": statistics.median(times["rite"]),
        "rite_over_adamw": ratio(times["rite"], times["lora"]),
        "repeats": repeats,
    }


def restart_costs(repeats: int) -> dict:
    """Seconds of a Chain-of-LoRA knot and an XGBLoRA round end, each against a plain step of its own model."""
    ids, labels = batch()
    result = {}
    for name, procedure in (("cola_knot", ChainOfLora({"links": TOTAL})), ("xgblora_round_end", XGBLora({"rounds": TOTAL, "layers": 8}))):
        run = Run(procedure)
        procedure.check_model(run.model)
        procedure.on_train_begin(run.state())
        steps, restarts = [], []
        for index in range(repeats + 1):
            run.step_index = index
            steps.append(timed(lambda run=run: run.step(ids, labels)))
            # links=rounds=TOTAL: every step ends a link / round (index 0 ends the warm-up step's)
            restarts.append(timed(lambda run=run, p=procedure: p.after_optimizer_step(run.state())))
        result[f"{name}_s"] = statistics.median(restarts[1:])
        result[f"{name}_over_step"] = statistics.median(r / s for r, s in zip(restarts[1:], steps[1:]))
        result[f"{name}_step_with_links_s"] = statistics.median(steps[1:])
    return result


def _peak_rss_child(variant: str) -> None:
    """Peak RSS of two steps (after setup: the kernel's high-water mark is reset) for "lora" or "flat"."""
    ids, labels = batch()
    run = Run(FlatLora({}) if variant == "flat" else None)
    common._BASE.clear()
    gc.collect()
    common.reset_peak_rss()
    run.step(ids, labels)
    run.step(ids, labels)
    print(json.dumps({"peak_rss_bytes": common.peak_rss_bytes()}))


def flat_memory() -> dict:
    peaks = {}
    for variant in ("lora", "flat"):
        out = subprocess.run([sys.executable, __file__, "--peak", variant], capture_output=True, text=True, check=True)
        peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    return {
        "lora_peak_rss_bytes": peaks["lora"],
        "flat_peak_rss_bytes": peaks["flat"],
        "flat_extra_peak_bytes": peaks["flat"] - peaks["lora"],
    }


def run(repeats: int = 7) -> dict:
    result = {"machine": common.machine(), "repeats": repeats}
    result.update(step_overheads(repeats))
    result.update(restart_costs(max(3, repeats // 2)))
    result.update(flat_memory())
    result["goals"] = GOALS
    result["met"] = {key: result[key] <= goal for key, goal in GOALS.items()}
    return result


def markdown(result: dict) -> str:
    rows = [
        ("Flat-LoRA noise generation / LoRA step", "flat_noise_over_step"),
        ("Flat-LoRA step / LoRA step", "flat_over_lora"),
        ("LoRA-RITE step / AdamW step", "rite_over_adamw"),
        ("Chain of LoRA knot / step", "cola_knot_over_step"),
        ("XGBLoRA round end / step", "xgblora_round_end_over_step"),
    ]
    lines = ["| measure | value | goal |", "|---|---|---|"]
    for label, key in rows:
        goal = GOALS.get(key)
        met = "" if goal is None else (" (met)" if result[key] <= goal else " (**not met**)")
        lines.append(f"| {label} | {result[key]:.3f}{met} | {'' if goal is None else f'≤ {goal:g}'} |")
    lines.append(
        f"| Flat-LoRA extra peak memory (MB) | {result['flat_extra_peak_bytes'] / 1e6:.0f} "
        f"(adapted weights: {result['adapted_weights_bytes'] / 1e6:.0f}) | |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        _peak_rss_child(sys.argv[2])
        sys.exit(0)
    out = run(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
    Path(__file__).with_name("results-procedures.json").write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(out))
