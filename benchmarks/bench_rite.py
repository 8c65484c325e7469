"""LoRA-RITE (lorakit.optim.LoraRite) against torch AdamW on SmolLM2-135M, LoRA r=16 all-linear, fp32:

- optimizer step alone: optimizer.step() on fixed random gradients (the same for both), many repetitions, median;
- full training step: forward + backward + step + zero_grad, batch 4×256, the two optimizers interleaved
  (A B A B ...) on two copies of the model; the ratio is the median of per-pair ratios (and, robust to a busy
  machine, the ratio of the fastest steps). Goal: RITE <= 1.3x AdamW.

`python benchmarks/bench_rite.py --quick` runs few repetitions (a shared machine); without it, more.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import common
import torch
from common import smollm2

import lorakit
from lorakit.optim import LoraRite

BATCH, LENGTH, RANK = 4, 256, 16
GOAL = 1.3


def adapted():
    return lorakit.adapt(smollm2(), lorakit.AdapterConfig(method="lora", r=RANK, alpha=RANK))


def optimizers(model) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    return {"rite": LoraRite(model, lr=1e-4), "adamw": torch.optim.AdamW(params, lr=1e-4)}


def step_only(repeats: int, warmup: int = 3) -> dict:
    """Seconds per optimizer.step() on random gradients; B is perturbed off zero, as during training."""
    model = adapted()
    gen = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    start_values = [p.detach().clone() for p in params]
    result = {}
    for name, optimizer in optimizers(model).items():
        with torch.no_grad():
            for p, value in zip(params, start_values):
                p.copy_(value)
        result[f"{name}_step_s"] = common.median_time(optimizer.step, repeats, warmup)
    result["rite_over_adamw"] = result["rite_step_s"] / result["adamw_step_s"]
    result["parameters"] = sum(p.numel() for p in params)
    result["repeats"] = repeats
    return result


def train_step(repeats: int, warmup: int = 1) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (BATCH, LENGTH), generator=gen)
    steps = {}
    for name in ("rite", "adamw"):
        model = adapted()
        optimizer = optimizers(model)[name]

        def step(model=model, optimizer=optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {f"{name}_train_step_s": statistics.median(values) for name, values in times.items()}
    result["rite_over_adamw"] = statistics.median(r / a for r, a in zip(times["rite"], times["adamw"]))
    result["rite_over_adamw_of_fastest"] = min(times["rite"]) / min(times["adamw"])  # robust to a busy machine
    result["goal"] = GOAL
    result["met"] = result["rite_over_adamw"] <= GOAL
    result["repeats"] = repeats
    return result


def run(quick: bool) -> dict:
    started = time.time()
    result = {"machine": common.machine()}
    result["optimizer_step"] = step_only(repeats=10 if quick else 50)
    print(json.dumps({"optimizer_step": result["optimizer_step"]}), flush=True)
    result["train_step"] = train_step(repeats=5 if quick else 9)
    result["total_s"] = time.time() - started
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a shared machine)")
    print(json.dumps(run(parser.parse_args().quick), indent=1))
