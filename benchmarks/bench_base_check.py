"""The base check on quantized bases: how far one quantization moves a fingerprint, and the detection limit.

For SmolLM2-135M (the built-in model) and each bitsandbytes scheme:
- the largest relative difference the check measures between a full-precision weight and its quantized copy
  (this bounds `lorakit.fingerprint.QUANTIZATION_ERROR`);
- the detection limit: the smallest relative change δ of ONE module (W + δ·‖W‖·N/‖N‖, N Gaussian) that the check
  still refuses (grid: 0.1% steps to 1%, then 0.5% steps), for the three pairs (trained on, loaded on): (quantized, quantized), (float32, quantized),
  (quantized, float32). Smaller changes pass as "the same model".

python benchmarks/bench_base_check.py  (about 1 minute on 2 cores); prints a table and writes
benchmarks/results-base-check.json.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

import torch

from lorakit.base_layers import frozen_base
from lorakit.fingerprint import DIFFERENT, Fingerprint, frozen_fingerprint
from lorakit.models import load_model
from lorakit.persist import REQUANTIZED_TOLERANCE, _same_once_quantized
from lorakit.quantize import quantize_model

MODULE = "model.layers.10.mlp.down_proj"
GRID = [round(0.001 * k, 3) for k in range(1, 10)] + [round(0.005 * k, 3) for k in range(2, 201)]
SETTINGS = {"nf4": {"scheme": "nf4", "blocksize": 64, "double_quant": True},
            "fp4": {"scheme": "fp4", "blocksize": 64, "double_quant": True}, "int8": {"scheme": "int8"}}


def quantized_fingerprint(weight: torch.Tensor, scheme: str) -> Fingerprint:
    model = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    model[0].weight.data.copy_(weight)
    quantize_model(model, scheme)
    return frozen_fingerprint(frozen_base(model[0]))


def perturbed(weight: torch.Tensor, delta: float) -> torch.Tensor:
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    return weight + delta * weight.norm() * noise / noise.norm()


def verdict(saved: Fingerprint, weight: torch.Tensor, scheme: str, saved_kind: str, current_kind: str) -> str:
    """What `lorakit.persist.check_base` decides for one module."""
    if current_kind == "float32":
        current = Fingerprint.of(weight)
        first, _ = saved.compare(current)
        if saved_kind != "float32":  # trained quantized, loaded full precision: quantized the same way first
            return _same_once_quantized(saved, weight, SETTINGS[scheme], first)
        return first
    first, difference = saved.compare(quantized_fingerprint(weight, scheme))
    if saved_kind != "float32":  # quantized the same way on both sides
        return first if difference <= REQUANTIZED_TOLERANCE else DIFFERENT
    return first


def detection_limit(weight: torch.Tensor, scheme: str, saved_kind: str, current_kind: str) -> float | None:
    saved = Fingerprint.of(weight) if saved_kind == "float32" else quantized_fingerprint(weight, scheme)
    for delta in GRID:
        if verdict(saved, perturbed(weight, delta), scheme, saved_kind, current_kind) == DIFFERENT:
            return delta
    return None


def main() -> None:
    started = time.time()
    base, _ = load_model("smollm2-135m")
    names = [n for n, m in base.named_modules() if type(m) is torch.nn.Linear and m is not base.get_output_embeddings()]
    full = {n: Fingerprint.of(base.get_submodule(n).weight) for n in names}
    weight = base.get_submodule(MODULE).weight.detach().clone()
    rows = []
    for scheme in ("nf4", "fp4", "int8"):
        quantized = quantize_model(copy.deepcopy(base), scheme)
        worst = max(full[n].compare(frozen_fingerprint(frozen_base(quantized.get_submodule(n))))[1] for n in names)
        limits = {
            f"{saved}->{current}": detection_limit(weight, scheme, saved, current)
            for saved, current in ((scheme, scheme), ("float32", scheme), (scheme, "float32"))
        }
        rows.append({"scheme": scheme, "largest_quantization_difference": round(worst, 4), "detection_limit": limits})
        print(f"{scheme}: largest difference full vs quantized over {len(names)} modules {worst:.4f}; "
              + ", ".join(f"{k} refused from δ={v}" for k, v in limits.items()))
    out = Path(__file__).with_name("results-base-check.json")
    out.write_text(json.dumps({
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "module": MODULE,
        "rows": rows,
        "seconds": round(time.time() - started, 1),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
