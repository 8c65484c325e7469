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
