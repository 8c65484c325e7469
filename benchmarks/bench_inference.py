"""Inference on SmolLM2-135M (batch 4×256, no grad): base vs merged adapter vs unmerged adapter; adapter file sizes."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import smollm2

import lorakit


def forward_times(repeats: int = 7) -> dict:
    ids = torch.randint(0, 49152, (4, 256), generator=torch.Generator().manual_seed(0))
    base = smollm2().eval()
    unmerged = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(method="lora", r=16))
    for _, layer in lorakit.adapter_layers(unmerged):
        torch.nn.init.normal_(layer.B, std=0.01)
    merged = lorakit.merge_and_unload(copy.deepcopy(unmerged))
    models = {"base": base, "merged": merged, "unmerged": unmerged}
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(ids)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(ids)
                times[name].append(time.perf_counter() - start)
    pair = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    return {
        **{f"{n}_s": statistics.median(v) for n, v in times.items()},
        "merged_over_base": pair("merged", "base"),
        "unmerged_over_base": pair("unmerged", "base"),
    }


def adapter_bytes() -> dict:
    base = smollm2()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in {
            "lora": dict(method="lora"),
            "olora": dict(method="olora"),
            "mini": dict(method="mini", mini_a=32, mini_b=32),
        }.items():
            model = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(r=16, **config))
            lorakit.save_adapter(model, Path(tmp) / label)
            result[f"{label}_bytes"] = (Path(tmp) / label / "adapter.safetensors").stat().st_size
            result[f"{label}_trainable"] = lorakit.summary(model).trainable
    result["lora_over_mini"] = result["lora_bytes"] / result["mini_bytes"]
    return result


if __name__ == "__main__":
    print(forward_times())
    print(adapter_bytes())
