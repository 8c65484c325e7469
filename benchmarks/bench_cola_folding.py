"""Chain of LoRA: what merging a finished link into a bf16 base weight would lose, against lorakit's frozen factors.

For every linear layer of SmolLM2-135M's block 1, a random rank-16 ΔW scaled to a given fraction of ‖W‖ is merged
into the bf16 weight (round(W + ΔW) to bf16, as the paper's merge would) and the rounding error is reported
relative to ‖ΔW‖. lorakit keeps finished links as frozen float32 factors beside W instead: error 0 by construction.

    python benchmarks/bench_cola_folding.py
"""

from __future__ import annotations

import torch
from common import smollm2


def run() -> dict:
    model = smollm2()
    gen = torch.Generator().manual_seed(0)
    result = {}
    for fraction in (1e-3, 1e-2, 1e-1):
        errors = []
        for name, module in model.named_modules():
            if not (isinstance(module, torch.nn.Linear) and ".layers.1." in name):
                continue
            weight = module.weight.detach().float().to(torch.bfloat16).float()
            a = torch.randn(16, weight.shape[1], generator=gen)
            b = torch.randn(weight.shape[0], 16, generator=gen)
            delta = b @ a
            delta *= fraction * weight.norm() / delta.norm()
            merged = (weight + delta).to(torch.bfloat16).float()
            errors.append(((merged - weight - delta).norm() / delta.norm()).item())
        result[f"{fraction:g}"] = {"mean_relative_error": sum(errors) / len(errors), "max": max(errors)}
    return result


if __name__ == "__main__":
    for fraction, figures in run().items():
        print(
            f"|ΔW| = {fraction} |W|: merged into the bf16 weight, the update is off by "
            f"{100 * figures['mean_relative_error']:.0f}% of |ΔW| (max {100 * figures['max']:.0f}%); frozen factors: 0"
        )
