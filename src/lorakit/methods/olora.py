"""OLoRA: Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", arXiv:2406.01775.

LoRA initialised from the QR decomposition of the frozen weight W (out × in, nn.Linear layout):

    Q, R = qr(W);  B0 = Q[:, :r];  A0 = R[:r];  W ← W − s · B0 A0;  training starts from (A, B) = (A0, B0)

so the model's output is unchanged at init. Only the first r columns of W determine these factors (Householder QR
builds column k's reflector from columns ≤ k), so lorakit takes a thin QR of W[:, :r] and A0 = Q_rᵀ W: O(out·in·r)
instead of the O(out·in·min(out, in)) of a full QR, with the same result. Computed in float32 and cast back.

The initial factors (A0, B0) are kept as buffers: `disabled()` and `unload()` then give the ORIGINAL model, and
export to plain LoRA can use ΔW = B A − B0 A0 = [B | −B0] [A ; A0] (rank 2r) relative to the original weight.
Use a learning rate like LoRA's; the paper reports faster convergence than LoRA at equal rank.
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
        self.remember_fingerprint()
        a, b = olora_factors(self.base_weight_linear(), self.r)
        for target in (self.A, self.A0):
            target.copy_(a)
        for target in (self.B, self.B0):
            target.copy_(b)
        self._mutate_base(a, b)

    @torch.no_grad()
    def _mutate_base(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.base_mutated = True
        weight = self.base_layer.weight
        if weight.dtype == torch.float32:
            # in place, one fused rank-r update: W -= s·B·A
            self.base_weight_linear().addmm_(b.to(weight.device), a.to(weight.device), alpha=-self.scale)
        else:
            w = weight.to(torch.float32) - self._layout((b * self.scale) @ a)
            weight.copy_(w.to(weight.dtype))

    def after_load(self) -> None:
        self._mutate_base(self.A0.to(torch.float32), self.B0.to(torch.float32))

    def factors(self):
        return self.A, self.B

    def initial_factors(self):
        return self.A0, self.B0
