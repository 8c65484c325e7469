"""Training-step time and peak memory on SmolLM2-135M (all-linear, r=16, batch 4×256, AdamW, fp32).

Configurations run interleaved (A B C D E A B C D E ...) in one process; the "bare" floor is the frozen model's
forward + backward to the input embeddings with no adapter. Peak memory (RSS) is measured per configuration in a
fresh subprocess, since a process's peak only grows.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import common
import torch
from common import smollm2

import lorakit

BATCH, LENGTH, RANK = 4, 256, 16


def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (BATCH, LENGTH), generator=gen)
    return ids, ids.clone()


def make(config: str):
    """(step function, model) for one configuration."""
    model = smollm2()
    ids, labels = batch()
    if config == "bare":
        for p in model.parameters():
            p.requires_grad_(False)
        embed = model.get_input_embeddings()

        def step():
            embeds = embed(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, labels=labels).loss.backward()

        return step, model
    if config == "peft_lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"))
    else:
        method = config.removeprefix("lorakit_")
        model = lorakit.adapt(model, lorakit.AdapterConfig(method=method, r=RANK, alpha=RANK, mini_a=32, mini_b=32))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


CONFIGS = ["bare", "peft_lora", "lorakit_lora", "lorakit_olora", "lorakit_mini"]


def step_times(repeats: int = 5, warmup: int = 1) -> dict:
    steps = {name: make(name)[0] for name in CONFIGS}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in CONFIGS}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {f"{name}_s": statistics.median(values) for name, values in times.items()}
    pair = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    result["lorakit_lora_over_peft_lora"] = pair("lorakit_lora", "peft_lora")
    result["lorakit_lora_over_bare"] = pair("lorakit_lora", "bare")
    result["peft_lora_over_bare"] = pair("peft_lora", "bare")
    result["lorakit_mini_over_lorakit_lora"] = pair("lorakit_mini", "lorakit_lora")
    result["lorakit_olora_over_lorakit_lora"] = pair("lorakit_olora", "lorakit_lora")
    result["repeats"] = repeats
    return result


def _peak_rss_child(config: str) -> None:
    """Peak RSS of two training steps, excluding model loading: the kernel's high-water mark is reset after setup."""
    import gc

    step, _ = make(config)
    common._BASE.clear()  # drop the loader's copy: the step's peak is what is measured
    gc.collect()
    common.reset_peak_rss()
    step()
    step()
    print(json.dumps({"peak_rss_bytes": common.peak_rss_bytes()}))


def peak_memory() -> dict:
    result = {}
    for config in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--peak", config], capture_output=True, text=True, check=True)
        result[f"{config}_peak_rss_bytes"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    result["lorakit_lora_over_peft_lora"] = result["lorakit_lora_peak_rss_bytes"] / result["peft_lora_peak_rss_bytes"]
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        _peak_rss_child(sys.argv[2])
    else:
        print(step_times(repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 5))
