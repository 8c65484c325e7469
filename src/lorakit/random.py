"""Deterministic per-module random matrices.

Every random matrix lorakit draws comes from a CPU generator seeded by (config seed, module name, purpose), so it
does not depend on module order, device or thread count, and frozen matrices can be regenerated bit-exactly from
the seed alone (an adapter file need not store them). Changing anything here changes regenerated matrices: the
pinned values in tests/test_random.py guard it.
"""

from __future__ import annotations

import hashlib
import math

import torch


def generator(seed: int, module_name: str, purpose: str) -> torch.Generator:
    digest = hashlib.sha256(f"lorakit:{seed}:{module_name}:{purpose}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def kaiming_uniform(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with a=sqrt(5), as nn.Linear's default: U(-1/sqrt(cols), 1/sqrt(cols))."""
    bound = 1.0 / math.sqrt(cols)
    return torch.rand(rows, cols, generator=gen, dtype=torch.float32).mul_(2 * bound).sub_(bound)


def down_projection(init: str, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """The trained factor that starts random (LoRA's A): Kaiming-uniform, or N(0, (1/rows)²) for "gaussian"."""
    if init == "gaussian":
        return gaussian(rows, cols, gen, std=1.0 / rows)
    return kaiming_uniform(rows, cols, gen)


def gaussian(rows: int, cols: int, gen: torch.Generator, std: float = 1.0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32).mul_(std)


def orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A random rows x cols matrix with orthonormal columns (cols <= rows), Haar-distributed.

    Drawn and orthonormalised in float64, then rounded to float32, so the result does not depend on the BLAS
    kernels of the machine beyond float64 round-off.
    """
    g = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q *= torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))  # unique, Haar measure
    return q.to(torch.float32)
