"""OLoRA: Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", arXiv:2406.01775.

LoRA initialised from the QR decomposition of the frozen weight W (out × in, nn.Linear layout):

    Q, R = qr(W);  B0 = Q[:, :r];  A0 = R[:r];  W ← W − s · B0 A0;  training starts from (A, B) = (A0, B0)

so the model's output is unchanged at init (paper, Section 3). Only the first r columns of W determine these factors
(Householder QR builds column k's reflector from columns ≤ k), so lorakit takes a thin QR of W[:, :r] and A0 = Q_rᵀ W:
O(out·in·r) instead of the O(out·in·min(out, in)) of a full QR, with the same result. Computed in float32.

lorakit never writes W − s·B0·A0 into the base weight (PEFT does). It keeps (A0, B0) as frozen buffers and computes

    y = W x + s · (B A − B0 A0) x = W x + s · [B | −B0] [A ; A0] x          (one rank-2r product)

which is the paper's model exactly, without rounding W − s·B0·A0 to the base dtype (in bf16 that rounding alone
changes the model at init). So the base stays bit-identical: `disabled()` and `unload()` are exact, the base
check sees the original weight, and export to plain LoRA is the same rank-2r [B | −B0] [A ; A0]. With dropout, the
−B0·A0 path sees the undropped input, as PEFT's mutated base does. The rank-2r product costs about twice LoRA's
adapter FLOPs (+~4% of a SmolLM2 layer's at r=16). Learning rate: about 9x below LoRA's (the reproduction's
sweeps, docs/reproduction.md: 1e-4 vs 9e-4 and 3e-4 vs 2.7e-3); the paper reports faster convergence than LoRA at
equal rank.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..layer import AdapterLayer
from . import register_method


def olora_factors(weight_linear: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) = (R[:r], Q[:, :r]) of W = QR, via a thin QR of W[:, :r]; float32 on W's device."""
    w = weight_linear.to(torch.float32)
    q, _ = torch.linalg.qr(w[:, :r].T.contiguous().T)  # out x r; column-major input is LAPACK's native layout
    a = q.T @ w  # r x in; equals R[:r] of the full QR
    return a, q.contiguous()


@register_method
class OLoraLayer(AdapterLayer):
    method = "olora"
    init_ignored = "A and B start from the QR decomposition of the frozen weight"
    trainable = ("A", "B")
    stored = ("A", "B", "A0", "B0")

    @classmethod
    def check_layer(cls, config, name, in_features, out_features):
        if config.r > min(in_features, out_features):
            raise ConfigError(
                f"r={config.r} is too large for olora on {name} ({in_features} -> {out_features}); "
                f"use r <= {min(in_features, out_features)}"
            )

    @classmethod
    def stored_shapes(cls, config, in_features, out_features):
        factor_shapes = {"A": (config.r, in_features), "B": (out_features, config.r)}
        return factor_shapes | {f"{key}0": shape for key, shape in factor_shapes.items()}

    def build(self) -> None:
        self.A = self.new_parameter(torch.zeros(self.r, self.in_features))
        self.B = self.new_parameter(torch.zeros(self.out_features, self.r))
        self.new_buffer("A0", torch.zeros(self.r, self.in_features))
        self.new_buffer("B0", torch.zeros(self.out_features, self.r))

    @torch.no_grad()
    def initialize(self) -> None:
        a, b = olora_factors(self.base_weight_linear(), self.r)
        for target in (self.A, self.A0):
            target.copy_(a)
        for target in (self.B, self.B0):
            target.copy_(b)

    def factors(self):
        return torch.cat([self.A, self.A0]), torch.cat([self.B, -self.B0], dim=1)

    def add_update(self, out, x):
        if self.dropout is None:
            return super().add_update(out, x)
        out = self._add_low_rank(out, x, self.A0, self.B0, scale=-self.scale)  # the "mutated base" sees x
        return self._add_low_rank(out, self.dropout(x), self.A, self.B)
