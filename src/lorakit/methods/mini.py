"""LoRA-Mini: Singh et al., "LoRA-Mini: Adaptation Matrices Decomposition and Selective Training",
arXiv:2411.15804.

Each LoRA factor is split into a frozen outer and a trained inner matrix:

    ΔW = s · B_out B_in A_in A_out,   A_out ∈ R^{a×in}, B_out ∈ R^{out×b} frozen (buffers),
                                      A_in ∈ R^{r×a} Kaiming-uniform, B_in ∈ R^{b×r} zeros, trained.

Trainable parameters per layer: r · (a + b) instead of LoRA's r · (in + out). The forward computes the effective
rank-r factors A = A_in A_out and B = B_out B_in (O(r·(a·in + b·out)) per call) and then runs as a rank-r LoRA:
x · Aᵀ · Bᵀ, the per-token cost of LoRA.

Outer matrices (`mini_outer`), all drawn from a generator seeded by (seed, module name), never stored in files:

- "orthonormal" (default): random matrices with orthonormal rows (A_out) / columns (B_out). They preserve norms,
  so the effective step is independent of layer width: use a learning rate about 3-10x LoRA's (e.g. 1e-3 to 3e-3
  where LoRA uses 3e-4).
- "normal": N(0, 1) entries, as in the authors' code. They scale the effective step by roughly √(in·out), so use
  a learning rate ~100x below LoRA's (e.g. 3e-5 where LoRA uses 3e-4); at LoRA's rate training diverges.
- "qr": orthonormal bases of the frozen weight itself (B_out from a thin QR of W's first b columns, A_out from a
  thin QR of Wᵀ's first a columns): an OLoRA × Mini combination. Recomputed from the base weight on load, so it
  needs the exact original base. Learning rate as for "orthonormal".
"""

from __future__ import annotations

import torch

from .. import random as lk_random
from ..config import MINI_OUTERS, _is_int
from ..errors import ConfigError
from ..layer import AdapterLayer
from . import register_method


@register_method
class MiniLayer(AdapterLayer):
    method = "mini"
    trainable = ("A_in", "B_in")
    stored = ("A_in", "B_in")

    @classmethod
    def check_config(cls, config):
        for field in ("mini_a", "mini_b"):
            value = getattr(config, field)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{field}={value!r} is invalid; use a positive integer such as 32")
        if config.mini_outer not in MINI_OUTERS:
            raise ConfigError(f"mini_outer={config.mini_outer!r} is unknown; use one of: {', '.join(MINI_OUTERS)}")

    @classmethod
    def check_layer(cls, config, name, in_features, out_features):
        if config.mini_outer == "normal":
            return
        limit_a, limit_b = in_features, out_features
        if config.mini_outer == "qr":
            limit_a = limit_b = min(in_features, out_features)
        for field, value, limit in (("mini_a", config.mini_a, limit_a), ("mini_b", config.mini_b, limit_b)):
            if value > limit:
                raise ConfigError(
                    f"{field}={value} is too large for mini_outer={config.mini_outer!r} on {name} "
                    f"({in_features} -> {out_features}); use {field} <= {limit} or mini_outer='normal'"
                )

    @classmethod
    def useful_rank(cls, config, in_features, out_features):
        # every B_out M A_out with rank(M) > k equals one with rank(M) <= k, k = min(rank B_out, rank A_out)
        bound = min(in_features, out_features, config.mini_a, config.mini_b)
        return bound, "B_out B_in A_in A_out has rank <= min(in, out, mini_a, mini_b)"

    @classmethod
    def stored_shapes(cls, config, in_features, out_features):
        return {"A_in": (config.r, config.mini_a), "B_in": (config.mini_b, config.r)}

    def build(self) -> None:
        a, b = self.config.mini_a, self.config.mini_b
        self.A_in = self.new_parameter(torch.zeros(self.r, a))
        self.B_in = self.new_parameter(torch.zeros(b, self.r))
        a_out, b_out = self._outer_matrices(a, b)
        self.new_buffer("A_out", a_out)
        self.new_buffer("B_out", b_out)

    def _outer_matrices(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        kind, seed = self.config.mini_outer, self.config.seed
        if kind == "qr":
            w = self.base_weight_linear().detach().to(torch.float32)
            b_out, _ = torch.linalg.qr(w[:, :b])  # out x b, spans W's leading column space
            a_out, _ = torch.linalg.qr(w.T[:, :a])  # in x a, spans W's leading row space
            return a_out.T.contiguous(), b_out.contiguous()
        gen_a = lk_random.generator(seed, self.name, "A_out")
        gen_b = lk_random.generator(seed, self.name, "B_out")
        if kind == "normal":
            return lk_random.gaussian(a, self.in_features, gen_a), lk_random.gaussian(self.out_features, b, gen_b)
        a_out = lk_random.orthonormal_columns(self.in_features, a, gen_a).T.contiguous()
        return a_out, lk_random.orthonormal_columns(self.out_features, b, gen_b)

    def initialize(self) -> None:
        gen = lk_random.generator(self.config.seed, self.name, "A_in")
        a_in = lk_random.down_projection(self.config.init, self.r, self.config.mini_a, gen)
        with torch.no_grad():
            self.A_in.copy_(a_in)
            self.B_in.zero_()

    def factors(self):
        return self.A_in @ self.A_out, self.B_out @ self.B_in

    def recomputed_factors(self):
        return self.factors() if self.config.mini_outer == "qr" else None
