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

Files store A and B only (LoRA's size): A0, B0 are non-persistent buffers recomputed from the base weight whenever
the layer is built (adapt, load), as LoRA-XS recomputes its SVD, so an adapter belongs on its original base. A file
keeps a sketch of s·B0·A0, and a load onto the base in another dtype checks the recomputed factors against it
(`lorakit.fingerprint`; fp32 -> bf16 on a tiny Llama: 0.3%). Files of earlier versions, which hold A0 and B0, are
still read, with A0 and B0 as saved. Under Chain of LoRA and XGBLoRA a later link factors the merged W + ΣΔW
(`rederive`, `AdapterLayer.init_weight_linear`); a checkpoint's file cannot rebuild that alone, so the procedure
keeps the sketch beside its links and checks it when it restores them on resume (`lorakit.procedures.cola`).
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
    stored = ("A", "B")
    recomputed_part = "s·B0·A0"
    derives_from_links = True

    @classmethod
    def check_layer(cls, config, name, in_features, out_features):
        if config.r > min(in_features, out_features):
            raise ConfigError(
                f"r={config.r} is too large for olora on {name} ({in_features} -> {out_features}); "
                f"use r <= {min(in_features, out_features)}"
            )

    @classmethod
    def stored_shapes(cls, config, in_features, out_features):
        return {"A": (config.r, in_features), "B": (out_features, config.r)}

    @classmethod
    def legacy_shapes(cls, config, in_features, out_features):
        return {"A0": (config.r, in_features), "B0": (out_features, config.r)}  # files of earlier versions

    def build(self) -> None:
        self.A = self.new_parameter(torch.zeros(self.r, self.in_features))
        self.B = self.new_parameter(torch.zeros(self.out_features, self.r))
        self.rederive()

    @torch.no_grad()
    def rederive(self) -> None:
        """(A0, B0) of the weight: W, or W + ΣΔW under Chain of LoRA / XGBLoRA (`init_weight_linear`)."""
        a0, b0 = olora_factors(self.init_weight_linear().detach(), self.r)
        device = self.base_layer.weight.device
        for name, tensor in (("A0", a0), ("B0", b0)):
            self.register_buffer(name, tensor.to(device, self.factor_dtype).contiguous(), persistent=False)

    @torch.no_grad()
    def initialize(self) -> None:
        self.A.copy_(self.A0)
        self.B.copy_(self.B0)

    def load_tensors(self, tensors):
        if "A0" in tensors:  # an earlier version's file: the initial factors as saved
            with torch.no_grad():
                self.A0.copy_(tensors["A0"])
                self.B0.copy_(tensors["B0"])
        super().load_tensors(tensors)

    def recomputed_factors(self):
        return self.A0, self.B0

    def factors(self):
        return torch.cat([self.A, self.A0]), torch.cat([self.B, -self.B0], dim=1)

    def add_update(self, out, x):
        if self.dropout is None:
            return super().add_update(out, x)
        out = self._add_low_rank(out, x, self.A0, self.B0, scale=-self.scale)  # the "mutated base" sees x
        return self._add_low_rank(out, self.dropout(x), self.A, self.B)
