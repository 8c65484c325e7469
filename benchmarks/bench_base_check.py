"""The base check on quantized bases: how far one quantization moves a fingerprint, and the detection limit.

For SmolLM2-135M (the built-in model) and each quantization (bitsandbytes nf4, fp4, int8; torchao NF4):
- the largest relative difference the check measures between a full-precision weight and its quantized copy
  (this bounds `lorakit.fingerprint.QUANTIZATION_ERROR`);
- the detection limit: the smallest relative change δ of ONE module (W + δ·‖W‖·N/‖N‖, N Gaussian) that the check
  still refuses (grid: 0.1% steps to 1%, then 0.5% steps), for the three pairs (trained on, loaded on): (quantized, quantized), (float32, quantized),
  (quantized, float32). Smaller changes pass as "the same model".

The verdicts are those of the code users run: a LoRA adapter is built on that module (alone in a model, quantized
with `lorakit.quantize.quantize_model` where the pair says so) and saved with `lorakit.save_adapter`; each
changed copy is then loaded with `lorakit.load_adapter`, and a `BaseModelMismatchError` is a refusal. The check
decides module by module, so one module alone gives the verdict it gets inside the whole model.

python benchmarks/bench_base_check.py  (a few minutes on 2 cores); prints a table and writes
benchmarks/results-base-check.json.
"""

from __future__ import annotations

import copy
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

import lorakit
from lorakit.base_layers import frozen_base
from lorakit.fingerprint import Fingerprint, frozen_fingerprint
from lorakit.models import load_model
from lorakit.quantize import quantize_model

MODULE = "model.layers.10.mlp.down_proj"
GRID = [round(0.001 * k, 3) for k in range(1, 10)] + [round(0.005 * k, 3) for k in range(2, 201)]
SCHEMES = ("nf4", "fp4", "int8", "torchao-nf4")


class OneModule(torch.nn.Module):
    """The module under test, alone (the check compares each module of a model on its own)."""

    def __init__(self, weight: torch.Tensor, scheme: str | None):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)
        self.requires_grad_(False)
        if scheme != "float32":
            quantize_model(self, scheme)


def perturbed(weight: torch.Tensor, delta: float) -> torch.Tensor:
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    return weight + delta * weight.norm() * noise / noise.norm()


def refused(adapter: Path, weight: torch.Tensor, kind: str) -> bool:
    """Whether `lorakit.load_adapter` refuses the adapter on this base (a warning is not a refusal)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            lorakit.load_adapter(OneModule(weight, kind), adapter)
        except lorakit.BaseModelMismatchError:
            return True
    return False


def detection_limit(weight: torch.Tensor, saved_kind: str, current_kind: str, work: Path) -> float | None:
    adapter = work / f"{saved_kind}-{current_kind}"
    trained = lorakit.adapt(OneModule(weight, saved_kind), lorakit.AdapterConfig(method="lora", r=4, targets=["proj"]))
    lorakit.save_adapter(trained, adapter)
    assert not refused(adapter, weight, current_kind), "the unchanged module must pass"
    for delta in GRID:
        if refused(adapter, perturbed(weight, delta), current_kind):
            return delta
    return None


def main() -> None:
    started = time.time()
    base, _ = load_model("smollm2-135m")
    names = [n for n, m in base.named_modules() if type(m) is torch.nn.Linear and m is not base.get_output_embeddings()]
    full = {n: Fingerprint.of(base.get_submodule(n).weight) for n in names}
    weight = base.get_submodule(MODULE).weight.detach().clone()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for scheme in SCHEMES:
            quantized = quantize_model(copy.deepcopy(base), scheme)
            worst = max(full[n].compare(frozen_fingerprint(frozen_base(quantized.get_submodule(n))))[1] for n in names)
            del quantized
            limits = {
                f"{saved}->{current}": detection_limit(weight, saved, current, Path(work))
                for saved, current in ((scheme, scheme), ("float32", scheme), (scheme, "float32"))
            }
            rows.append({"scheme": scheme, "largest_quantization_difference": round(worst, 4), "detection_limit": limits})
            print(f"{scheme}: largest difference full vs quantized over {len(names)} modules {worst:.4f}; "
                  + ", ".join(f"{k} refused from δ={v}" for k, v in limits.items()), flush=True)
    out = Path(__file__).with_name("results-base-check.json")
    out.write_text(json.dumps({
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "module": MODULE,
        "verdicts": "lorakit.load_adapter on a model of that one module",
        "rows": rows,
        "seconds": round(time.time() - started, 1),
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
