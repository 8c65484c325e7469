"""Base-weight fingerprints: does this base model hold the weights an adapter was trained on?

An adapter records, for each adapted module, a `Fingerprint` of the ORIGINAL base weight, taken when the adapter
layer is created (before OLoRA, merge or anything else could touch the weight, and before FSDP shards it):

- `digest`: sha256 over dtype, shape, the wrap-around 64-bit sum of ALL raw words and 65,536 strided elements.
  Equal digests mean the same bits: accepted at once.
- `norm` (Frobenius, all elements) and `samples` (128 strided elements as float32): compared with a tolerance when
  the digests differ, so that the same weights in another floating dtype (an fp32 adapter served on a bf16 base)
  or a restored base (after merge + unmerge, whose last bits differ) are still recognised.

The tolerance comes from the dtypes involved: with u(dtype) the unit round-off (float32 2⁻²⁴, float16 2⁻¹¹,
bfloat16 2⁻⁸), two weights are the same base when

    ‖s_saved − s_now‖ / ‖s_saved‖ ≤ tol   and   |n_saved − n_now| / n_saved ≤ tol,
    tol = max(u(saved dtype) + u(current dtype), 1e-4)

over the samples s and norms n. One rounding to bf16 moves the samples by ≈0.16% RMS (tol 0.39% against float32,
0.78% bf16 against bf16); 1% relative noise on one module moves them by 1%, another random init by ~140%: both
are refused in every dtype pair. The 1e-4 floor covers float32 merge + unmerge round-off. The samples are strided
so they touch every row of the weight; a change confined to unsampled elements of a module is caught only by the
exact digest (which then asks for the tolerance check, which can miss it): such a base is accepted.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

DIGEST_SAMPLES = 1 << 16
TOLERANCE_SAMPLES = 128
TOLERANCE_FLOOR = 1e-4
UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
}

# Quantized bases: the largest relative error of one quantization of a weight, as the base check measures it (128
# strided samples and the norm, against the full-precision weight). Measured (benchmarks/bench_base_check.py) on
# SmolLM2-135M's 210 adapted weights (from its Q4_1 GGUF, irregular) and a Gaussian 2048 x 5632 weight: nf4 0.147
# and 0.099, fp4 0.187 and 0.125, int8 0.0147 and 0.0087. The bounds leave 1.5x room over SmolLM2's worst module.
QUANTIZATION_ERROR = {"nf4": 0.22, "fp4": 0.28, "torchao-nf4": 0.22, "int8": 0.022}

SAME, SAME_OTHER_DTYPE, DIFFERENT = "same", "same weights in another dtype", "different"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_digest(weight: torch.Tensor) -> str:
    """sha256 over dtype, shape, the 64-bit wrap-around sum of all raw words and 65,536 strided elements.

    One memory-bound integer pass instead of hashing every byte (~4 ms per 4096² weight), identical across thread
    counts (modular integer addition is associative).
    """
    flat = weight.detach().reshape(-1)
    raw = flat.view(torch.uint8)
    words = raw.view(torch.int64) if raw.numel() % 8 == 0 else raw.to(torch.int64)
    if words.device.type == "cpu":  # numpy's unsigned sum wraps around by definition
        total = int(words.numpy().view(np.uint64).sum(dtype=np.uint64))
    else:
        total = int(words.sum()) % (1 << 64)
    stride = max(1, flat.numel() // DIGEST_SAMPLES)
    sample = flat[::stride][:DIGEST_SAMPLES].to("cpu").contiguous()
    digest = hashlib.sha256(f"{weight.dtype}:{tuple(weight.shape)}:{total}:".encode())
    digest.update(memoryview(sample.view(torch.uint8).numpy()))
    return digest.hexdigest()


def tolerance(saved_dtype: str, current_dtype: str) -> float:
    """Relative tolerance between two copies of one weight stored in these dtypes (see the module docstring)."""
    worst = 2.0**-8  # an unknown dtype is treated as the coarsest float

    def error(dtype: str) -> float:
        return QUANTIZATION_ERROR.get(dtype) or UNIT_ROUNDOFF.get(dtype, worst)

    return max(error(saved_dtype) + error(current_dtype), TOLERANCE_FLOOR)


def is_quantized(dtype: str) -> bool:
    return dtype in QUANTIZATION_ERROR


@dataclass(frozen=True)
class Fingerprint:
    dtype: str
    shape: tuple[int, ...]
    digest: str
    norm: float
    samples: torch.Tensor  # float32, TOLERANCE_SAMPLES strided elements (fewer for tiny weights)

    @classmethod
    def of(cls, weight: torch.Tensor, dtype: str | None = None) -> Fingerprint:
        """`dtype` names a quantized weight's storage ("nf4", ...) when `weight` is its dequantized copy."""
        flat = weight.detach().reshape(-1)
        stride = max(1, flat.numel() // TOLERANCE_SAMPLES)
        samples = flat[::stride][:TOLERANCE_SAMPLES].to("cpu", torch.float32).contiguous()
        norm = float(torch.linalg.vector_norm(flat, dtype=torch.promote_types(flat.dtype, torch.float32)))
        return cls(dtype or dtype_name(weight.dtype), tuple(weight.shape), weight_digest(weight), norm, samples)

    def to_json(self) -> dict:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "digest": self.digest,
            "norm": self.norm,
            "samples": base64.b64encode(self.samples.numpy().astype("<f4").tobytes()).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: dict) -> Fingerprint:
        """Inverse of `to_json`; raises ValueError on anything malformed (callers turn it into a file error)."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        dtype, shape, digest, norm = data.get("dtype"), data.get("shape"), data.get("digest"), data.get("norm")
        if not isinstance(dtype, str) or not isinstance(digest, str) or len(digest) != 64:
            raise ValueError("dtype or digest missing")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError("shape is not a list of sizes")
        if not isinstance(norm, int | float) or not math.isfinite(norm) or norm < 0:
            raise ValueError("norm is not a finite number")
        raw = base64.b64decode(data.get("samples", ""), validate=True)
        if len(raw) % 4 or len(raw) // 4 > TOLERANCE_SAMPLES:
            raise ValueError("samples have the wrong length")
        samples = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32))
        return cls(dtype, tuple(shape), digest, float(norm), samples)

    def compare(self, current: Fingerprint) -> tuple[str, float]:
        """(verdict, relative difference) of `current` against this saved fingerprint."""
        if self.shape != current.shape:
            return DIFFERENT, math.inf
        if self.digest == current.digest:
            return SAME, 0.0
        if self.samples.shape != current.samples.shape:
            return DIFFERENT, math.inf
        scale = max(float(torch.linalg.vector_norm(self.samples)), 1e-30)
        sample_diff = float(torch.linalg.vector_norm(self.samples - current.samples)) / scale
        norm_diff = abs(self.norm - current.norm) / max(self.norm, 1e-30)
        difference = max(sample_diff, norm_diff)
        if difference > tolerance(self.dtype, current.dtype):
            return DIFFERENT, difference
        return (SAME if self.dtype == current.dtype else SAME_OTHER_DTYPE), difference


def frozen_fingerprint(frozen) -> Fingerprint:
    """The fingerprint of a `lorakit.base_layers.FrozenBase`: of the stored weight as it is for a dense layer (as
    every earlier version recorded it), of its dequantized weight, under the quantization's name, otherwise."""
    if frozen.quantization is None:
        return Fingerprint.of(frozen.module.weight)
    return Fingerprint.of(frozen.fingerprint_weight(), dtype=frozen.quantization)


# ----------------------------------------------------------------- recomputed factors
# LoRA-XS (U_r, Σ_r V_rᵀ), LoRA-Mini "qr" (its outer matrices) and OLoRA (A0, B0) rebuild frozen factors from the
# base weight when loaded, instead of storing them. From a base in another dtype (or on other hardware) the rebuilt
# factors can differ: singular vectors of nearly equal singular values mix, or a canonical sign flips. A file
# therefore holds, per module, a sketch of the update those factors give, s·B·A (`AdapterLayer.recomputed_factors`):
#
#     S = Gᵀ (s·B·A) H,   G ∈ R^{out×k}, H ∈ R^{in×k} N(0, 1) from a fixed seed, k = 8,
#
# and a load rebuilds it from the new factors. ‖S' − S‖ / ‖S‖ estimates the relative change ‖ΔW' − ΔW‖ / ‖ΔW‖ of
# the update (E‖Gᵀ X H‖² = k²‖X‖²; the estimate is within a factor ~1.3 at k = 8). Above RECOMPUTE_TOLERANCE the
# load is refused (strict) or warned about with the measured figure.
SKETCH_PROBES = 8
SKETCH_SEED = 20_240_517
RECOMPUTE_TOLERANCE = 0.05


def _probes(rows: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SKETCH_SEED + rows)
    return torch.randn(rows, SKETCH_PROBES, generator=gen, dtype=torch.float64).to(device)


def update_sketch(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Gᵀ (scale·B·A) H (k × k, float64 on the CPU) of the update with factors A (r × in), B (out × r), computed from
    the factors (no dense out × in product)."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    left = _probes(b.shape[0], b.device).T @ b  # k × r
    right = a @ _probes(a.shape[1], a.device)  # r × k
    return (scale * left @ right).cpu()


def sketch_to_json(sketch: torch.Tensor) -> str:
    return base64.b64encode(sketch.numpy().astype("<f8").tobytes()).decode("ascii")


def sketch_from_json(data) -> torch.Tensor:
    """Inverse of `sketch_to_json`; raises ValueError on anything malformed."""
    if not isinstance(data, str):
        raise ValueError("not a string")
    raw = base64.b64decode(data, validate=True)
    if len(raw) != 8 * SKETCH_PROBES**2:
        raise ValueError("wrong length")
    sketch = torch.from_numpy(np.frombuffer(raw, dtype="<f8").copy()).reshape(SKETCH_PROBES, SKETCH_PROBES)
    if not torch.isfinite(sketch).all():
        raise ValueError("not finite")
    return sketch


def sketch_change(saved: torch.Tensor, current: torch.Tensor) -> float:
    """Relative change of the update between two sketches (0 when both are zero: an update that is 0 stays 0)."""
    difference = float(torch.linalg.vector_norm(current - saved))
    size = float(torch.linalg.vector_norm(saved))
    if difference == 0.0:
        return 0.0
    return difference / size if size > 0 else math.inf
