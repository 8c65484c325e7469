"""The training RNG (dropout) of each process: seeded per process, captured and restored per process.

Every process draws its own dropout masks: its generators are seeded from (run seed, process rank), so two
processes never share masks. What must be identical on every process does not come from these generators: the
adapter init uses per-module generators (`lorakit.random`) and the data order `batches.global_batch(seed, step)`.
A checkpoint keeps the state of every process, and a resumed process continues from its own.
"""

from __future__ import annotations

import hashlib
import random

import torch


def process_seed(seed: int, rank: int) -> int:
    """The training-RNG seed of process `rank` in a run seeded with `seed` (distinct per rank, 63 bits)."""
    digest = hashlib.sha256(f"lorakit:train-rng:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_process(seed: int, rank: int) -> None:
    """Seed this process's torch (CPU and every GPU) and Python generators for training."""
    value = process_seed(seed, rank)
    torch.manual_seed(value)
    random.seed(value)


def capture() -> dict:
    """This process's generator states: {"torch": ByteTensor, "cuda": [ByteTensor...], "python": JSON-able}."""
    state = {"torch": torch.get_rng_state(), "python": encode_python_random(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: dict) -> None:
    """Put the states of `capture()` back into this process's generators."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(decode_python_random(state["python"]))


def encode_python_random(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def decode_python_random(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
