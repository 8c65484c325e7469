"""Deterministic batches: which examples a (step, micro-batch, process) sees depends only on the seed and step.

The global batch of step t is positions [t·G, (t+1)·G) of an endless stream of seeded per-epoch permutations,
G = batch_size × processes × grad_accum. Micro-batch k of process p takes its own contiguous slice, so 2
processes × batch B see exactly the examples 1 process × batch 2B sees, and a resumed run sees what an
uninterrupted one would have.
"""

from __future__ import annotations

import torch

from ..data.formats import IGNORE


def global_batch(num_examples: int, step: int, size: int, seed: int) -> list[int]:
    """Example indices of the global batch of `step` (0-based)."""
    indices = []
    for position in range(step * size, (step + 1) * size):
        epoch, offset = divmod(position, num_examples)
        indices.append(int(_permutation(num_examples, seed, epoch)[offset]))
    return indices


_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _CACHE:
        if len(_CACHE) > 4:
            _CACHE.clear()
        _CACHE[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return _CACHE[key]


def micro_batch(indices: list[int], accum_index: int, process: int, batch_size: int, processes: int) -> list[int]:
    start = (accum_index * processes + process) * batch_size
    return indices[start : start + batch_size]


def trained_tokens(example: dict) -> int:
    """Tokens that carry a loss (labels shifted by one, as the causal LM predicts the next token)."""
    return sum(1 for label in example["labels"][1:] if label != IGNORE)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
