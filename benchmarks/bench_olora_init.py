"""OLoRA initialisation time, lorakit vs PEFT: (a) two big linear layers, (b) the whole SmolLM2-135M."""

from __future__ import annotations

import copy
import time

import torch
from common import median_time, smollm2
from torch import nn

import lorakit


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.square = nn.Linear(4096, 4096, bias=False)
        self.wide = nn.Linear(4096, 11008, bias=False)


def _peft(model, init, r=16):
    import peft

    return peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=r,
            lora_alpha=r,
            target_modules="all-linear" if init != "olora-layers" else ["square", "wide"],
            init_lora_weights="olora" if init.startswith("olora") else True,
        ),
    )


def _timed(fn, base):
    model = copy.deepcopy(base)
    start = time.perf_counter()
    result = fn(model)
    return time.perf_counter() - start, result


def layers(repeats: int = 3) -> dict:
    base = TwoLayers()
    ours_times, peft_times, errors = [], [], []
    for _ in range(repeats):  # interleaved pairs
        t_ours, ours = _timed(
            lambda m: lorakit.adapt(m, lorakit.AdapterConfig(method="olora", r=16, targets=["square", "wide"])), base
        )
        t_peft, theirs = _timed(lambda m: _peft(m, "olora-layers"), base)
        ours_times.append(t_ours)
        peft_times.append(t_peft)
    for name in ("square", "wide"):
        ours_layer, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        for mine, their in (
            (ours_layer.A, peft_layer.lora_A["default"].weight),
            (ours_layer.B, peft_layer.lora_B["default"].weight),
            (ours_layer.base_layer.weight, peft_layer.base_layer.weight),
        ):
            errors.append(((mine - their).norm() / their.norm()).item())
    ratios = sorted(p / o for p, o in zip(peft_times, ours_times))
    return {
        "lorakit_s": sorted(ours_times)[len(ours_times) // 2],
        "peft_s": sorted(peft_times)[len(peft_times) // 2],
        "speedup": ratios[len(ratios) // 2],
        "max_relative_error": max(errors),
    }


def whole_model(repeats: int = 5) -> dict:
    base = smollm2()
    results = {}
    configs = {
        "lorakit_lora": lambda m: lorakit.adapt(m, lorakit.AdapterConfig(method="lora", r=16)),
        "lorakit_olora": lambda m: lorakit.adapt(m, lorakit.AdapterConfig(method="olora", r=16)),
        "lorakit_mini": lambda m: lorakit.adapt(m, lorakit.AdapterConfig(method="mini", r=16)),
        "peft_lora": lambda m: _peft(m, "lora"),
        "peft_olora": lambda m: _peft(m, "olora"),
    }
    times = {name: [] for name in configs}
    for _ in range(repeats):
        for name, fn in configs.items():
            if name == "peft_olora" and len(times[name]) >= 2:
                continue  # slow; two samples are enough for a reference figure
            times[name].append(_timed(fn, base)[0])
    for name, values in times.items():
        results[f"{name}_s"] = sorted(values)[len(values) // 2]
    results["olora_over_lora"] = results["lorakit_olora_s"] / results["lorakit_lora_s"]
    return results


if __name__ == "__main__":
    print(layers())
    print(whole_model())
    del median_time
