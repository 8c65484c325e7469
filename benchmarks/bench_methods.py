"""Every adapter method on SmolLM2-135M against LoRA at the same r, in one process: whole-model init time,
training-step time (batch 4×256, AdamW, fp32; configurations interleaved), trainable parameters, adapter file
bytes, and merged inference against the base model.

LoRA-XS, MELoRA, PRoLoRA, LoRA-Mini and MoRA adapt all linear layers and are compared with LoRA all-linear;
LoRTA adapts q/k/v/o (its design) and is compared with LoRA on q/k/v/o.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from common import smollm2

import lorakit

BATCH, LENGTH, RANK = 4, 256, 16
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

# label -> (AdapterConfig kwargs, label of the LoRA it is compared with)
CONFIGS = {
    "lora": (dict(method="lora"), "lora"),
    "olora": (dict(method="olora"), "lora"),
    "mini": (dict(method="mini", mini_a=32, mini_b=32), "lora"),
    "loraxs": (dict(method="loraxs"), "lora"),
    "melora": (dict(method="melora"), "lora"),
    "prolora": (dict(method="prolora"), "lora"),
    "mora-rope": (dict(method="mora", extra={"kind": "rope"}), "lora"),
    "mora-sharing": (dict(method="mora", extra={"kind": "sharing"}), "lora"),
    "lora-qkvo": (dict(method="lora", targets=ATTENTION), "lora-qkvo"),
    "lorta": (dict(method="lorta", targets=ATTENTION), "lora-qkvo"),
}
GOALS = {"loraxs": 1.10, "melora": 1.10, "prolora": 1.10, "mora-rope": 1.25, "mora-sharing": 1.25, "lorta": 1.25}


def config(label: str) -> lorakit.AdapterConfig:
    kwargs, _ = CONFIGS[label]
    return lorakit.AdapterConfig(r=RANK, alpha=RANK, **kwargs)


def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (BATCH, LENGTH), generator=gen)
    return ids, ids.clone()


def init_times(repeats: int = 3) -> dict:
    """Seconds for lorakit.adapt on a fresh SmolLM2 copy (the copy is made outside the timed region)."""
    result = {}
    for label in CONFIGS:
        times = []
        for _ in range(repeats):
            model = smollm2()
            start = time.perf_counter()
            lorakit.adapt(model, config(label))
            times.append(time.perf_counter() - start)
        result[label] = statistics.median(times)
    return result


def sizes() -> dict:
    result = {}
    for label in CONFIGS:
        model = lorakit.adapt(smollm2(), config(label))
        with tempfile.TemporaryDirectory() as tmp:
            path = lorakit.save_adapter(model, tmp)
            result[label] = {
                "trainable": lorakit.summary(model).trainable,
                "file_bytes": (Path(path) / "adapter.safetensors").stat().st_size,
            }
    return result


def step_times(repeats: int = 3, warmup: int = 1) -> dict:
    ids, labels = batch()
    steps = {}
    for label in CONFIGS:
        model = lorakit.adapt(smollm2(), config(label))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer):
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[label] = step
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {label: [] for label in CONFIGS}
    for _ in range(repeats):
        for label, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    result = {}
    for label, (_, reference) in CONFIGS.items():
        ratio = statistics.median(x / y for x, y in zip(times[label], times[reference]))
        result[label] = {"step_s": statistics.median(times[label]), "over_lora": ratio, "vs": reference}
    return result


@torch.no_grad()
def merged_inference(repeats: int = 5) -> dict:
    ids, _ = batch()
    base = smollm2().eval()
    models = {"base": base}
    for label in CONFIGS:
        model = lorakit.adapt(smollm2(), config(label))
        for param in lorakit.inject.trainable_parameters(model):  # a trained-looking adapter (LoRTA's shared
            param.normal_(0, 1e-3)  # tensors included), then merged
        models[label] = lorakit.merge(model).eval()
    times = {label: [] for label in models}
    for _ in range(repeats + 1):
        for label, model in models.items():
            start = time.perf_counter()
            model(input_ids=ids)
            times[label].append(time.perf_counter() - start)
    base_times = times["base"][1:]
    return {
        label: statistics.median(x / y for x, y in zip(values[1:], base_times))
        for label, values in times.items()
        if label != "base"
    }


def run(repeats: int = 3) -> dict:
    return {
        "init_s": init_times(),
        "sizes": sizes(),
        "train_step": step_times(repeats=repeats),
        "merged_over_base": merged_inference(),
        "goals_train_step_over_lora": GOALS,
        "train_step_repeats": repeats,  # after one warm-up; init: 3, merged inference: 5
        "machine": common.machine(),
    }


def markdown(result: dict) -> str:
    lines = [
        "| method | vs | init (s) | train step (s) | step / LoRA | goal | trainable | file bytes | merged / base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in CONFIGS:
        step = result["train_step"][label]
        goal = GOALS.get(label)
        met = "" if goal is None else (" (met)" if step["over_lora"] <= goal else " (**not met**)")
        lines.append(
            f"| {label} | {step['vs']} | {result['init_s'][label]:.3f} | {step['step_s']:.2f} | "
            f"{step['over_lora']:.3f}{met} | {'' if goal is None else f'≤ {goal:g}'} | "
            f"{result['sizes'][label]['trainable']:,} | {result['sizes'][label]['file_bytes']:,} | "
            f"{result['merged_over_base'][label]:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import json

    out = run(repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    Path(__file__).with_name("results-methods.json").write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(out))
