"""Optimizers for adapter training: `LoraRite` (LoRA-RITE, arXiv:2410.20625), a transformation-invariant
preconditioner for LoRA-style (A, B) pairs."""

from .rite import LoraRite, factor_pairs

__all__ = ["LoraRite", "factor_pairs"]
