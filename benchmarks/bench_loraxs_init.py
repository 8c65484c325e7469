"""LoRA-XS initialisation: the top-r SVD of one weight, its time and its accuracy, lorakit vs the alternatives.

For each weight (r = 16): lorakit (`lorakit.adapt` with method="loraxs" on a one-layer module), a dense
`torch.linalg.svd(W, full_matrices=False)` in float32, the authors' sklearn `TruncatedSVD(n_components=r,
n_iter=10, random_state=42)` fitted to Wᵀ (MohammadrezaBanaei/LoRA-XS utils/svd_utils.py), and PEFT's TinyLoRA
init (`peft.get_peft_model` with `TinyLoraConfig(r=r)`, which takes a full thin SVD of every target weight).
Accuracy: the sine of the largest principal angle between each method's top-r left / right singular subspaces and
the exact ones (the worse of the two); lorakit aims at <= 1e-4.

Weights: SmolLM2-135M layer 15 (576x576 q_proj, 576x1536 down_proj, 1536x576 up_proj, 192x576 k_proj; exact
subspaces from a float64 SVD) and two synthetic LLaMA-7B shapes (4096x4096, 4096x11008): a head of 64 singular
values i^-0.5 above a Gaussian bulk whose top edge is 0.95 σ_64, so the exact top-64 triplets are known by
construction (to ~1e-6 after rounding W to float32). `--quick`: two small synthetic weights, one repetition.

    python benchmarks/bench_loraxs_init.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import common
import torch
from torch import nn

import lorakit

RANK = 16


class One(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.proj.weight = nn.Parameter(weight.clone(), requires_grad=False)


def synthetic(m: int, n: int, head: int = 64, seed: int = 0):
    """(W float32, exact U_head, exact V_head): i^-0.5 head over an orthogonal Gaussian bulk."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, head, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, head, generator=gen, dtype=torch.float64))[0]
    s = torch.arange(1, head + 1, dtype=torch.float64) ** -0.5
    bulk = torch.randn(m, n, generator=gen, dtype=torch.float64)
    bulk -= u @ (u.T @ bulk)
    bulk -= (bulk @ v) @ v.T
    bulk *= 0.95 * s[-1] / (math.sqrt(m) + math.sqrt(n))  # top edge of a Gaussian's spectrum: σ(√m + √n)
    return ((u * s) @ v.T + bulk).float(), u, v


def exact(weight: torch.Tensor):
    u, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return weight, u[:, :RANK], vh[:RANK].T


def weights(quick: bool) -> dict:
    if quick:
        return {f"synthetic {m}x{n}": (lambda m=m, n=n: synthetic(m, n)) for m, n in ((576, 576), (576, 1536))}
    found = {}
    try:
        model = common.smollm2()
        for name in ("self_attn.q_proj", "mlp.down_proj", "mlp.up_proj", "self_attn.k_proj"):
            w = model.get_submodule(f"model.layers.15.{name}").weight.detach().float()
            found[f"SmolLM2 {name} {w.shape[0]}x{w.shape[1]}"] = lambda w=w: exact(w)
    except Exception as exc:  # no cached model and no network: the synthetic shapes still run
        print(f"SmolLM2 weights unavailable ({exc}); synthetic shapes only", file=sys.stderr)
    for m, n in ((4096, 4096), (4096, 11008)):
        found[f"synthetic {m}x{n}"] = lambda m=m, n=n: synthetic(m, n)
    return found


def sin_angle(approx: torch.Tensor, reference: torch.Tensor) -> float:
    """Sine of the largest principal angle between span(approx) (any basis) and span(reference) (orthonormal)."""
    q = torch.linalg.qr(approx.detach().double())[0]
    ref = reference[:, : q.shape[1]].double()
    return torch.linalg.matrix_norm(q - ref @ (ref.T @ q), ord=2).item()


def _lorakit(module):
    layer = lorakit.adapt(module, lorakit.AdapterConfig(method="loraxs", r=RANK, targets=["proj"])).proj
    return layer.U, layer.SVt.T


def _dense(w):
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :RANK], vh[:RANK].T


def _sklearn(w):
    from sklearn.decomposition import TruncatedSVD

    svd = TruncatedSVD(n_components=RANK, n_iter=10, random_state=42)  # the authors' settings, fitted to Wᵀ
    encoded = svd.fit(w.T.numpy()).transform(w.T.numpy())  # Wᵀ U_r = V_r Σ_r: spans V_r
    return torch.from_numpy(svd.components_.T.copy()), torch.from_numpy(encoded)


def _tinylora(module):
    import peft

    model = peft.get_peft_model(module, peft.TinyLoraConfig(r=RANK, target_modules=["proj"]))
    layer = model.base_model.model.proj
    return layer.tinylora_B["default"], layer.tinylora_A["default"].T  # U_r √Σ_r, V_r √Σ_r


# name -> (function, takes a one-layer module rather than the weight, full dense SVD inside)
METHODS = {
    "lorakit": (_lorakit, True, False),
    "dense torch.linalg.svd": (_dense, False, True),
    "sklearn TruncatedSVD(n_iter=10)": (_sklearn, False, False),
    "PEFT TinyLoRA": (_tinylora, True, True),
}


def measure(w, ref_u, ref_v, repeats: int) -> dict:
    results = {}
    for label, (fn, on_module, dense) in METHODS.items():
        times = []
        for _ in range(1 if dense and min(w.shape) >= 2048 else repeats):  # those take tens of seconds
            arg = One(w) if on_module else w
            start = time.perf_counter()
            u, v = fn(arg)
            times.append(time.perf_counter() - start)
        error = max(sin_angle(u, ref_u), sin_angle(v, ref_v))
        results[label] = {"s": statistics.median(times), "sin": error}
    return results


def run(quick: bool = False) -> dict:
    torch.manual_seed(0)
    warm = torch.randn(320, 256)  # imports (peft, sklearn) and first-call costs stay out of the figures
    measure(warm, *exact(warm)[1:], repeats=1)
    rows = {}
    for label, build in weights(quick).items():
        w, ref_u, ref_v = build()
        rows[label] = measure(w, ref_u, ref_v, repeats=1 if quick else 3)
        print(f"[loraxs-init] {label}: {rows[label]}", file=sys.stderr, flush=True)
    return rows


def markdown(rows: dict) -> str:
    others = [name for name in METHODS if name != "lorakit"]
    header = "| weight (r=16) | lorakit s | sin | " + " | ".join(f"{n} s | sin | / lorakit" for n in others) + " |"
    lines = [header, "|" + "---|" * (3 + 3 * len(others))]
    for label, row in rows.items():
        ours = row["lorakit"]
        cells = [f"{ours['s']:.3f}", f"{ours['sin']:.1e}"]
        for name in others:
            cells += [f"{row[name]['s']:.3f}", f"{row[name]['sin']:.1e}", f"{row[name]['s'] / ours['s']:.1f}x"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small synthetic weights, one repetition")
    args = parser.parse_args()
    started = time.time()
    table = markdown(run(quick=args.quick))
    machine = common.machine()
    print(
        f"{machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, peft {machine['peft']}"
    )
    print(table)
    print(f"\ntotal {time.time() - started:.0f} s; sin: sine of the largest principal angle to the exact subspaces")
