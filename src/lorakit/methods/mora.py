"""MoRA: Jiang et al., "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning", arXiv:2405.12130.

One trained square matrix M ∈ R^{r̂×r̂} between a non-parametric compression of x and a decompression to `out`:

    y = W x + decompress(M · compress(x)),   r̂ = ⌊√((in + out)·r) + 0.5⌋,   M = 0 at init

so a layer trains r̂² ≈ r·(in + out) parameters, LoRA's count at rank r (the rounding to nearest is the authors'
code, `update_layer` in kongds/MoRA peft-mora/src/peft/tuners/lora/layer.py; their README and the paper's
formula write ⌊·⌋). x is wrap-around padded to n·r̂ features, x_pad[i] = x[i mod in] (the authors concatenate
x[:pad]; taking i mod in also covers r̂ > in, where their `view` fails), and cut into n = ⌈in/r̂⌉ chunks x_c.
`kind` (`AdapterConfig.extra`):

- "rope" (default; the authors' type 6, their choice for small r, paper Eq. 9): r̂ rounded down to even; each chunk
  is rotated by RoPE at position c (the chunk index; HF rotate_half layout, θ_j = 10000^(−2j/r̂)) and multiplied
  by M: y_c = M·RoPE_c(x_c). The y_c are concatenated, truncated to `out`, or tiled when out > n·r̂. ΔW is
  block-diagonal (blocks M·R_c) up to padding / truncation / tiling: rank min(in, out) for a generic M. Chunks
  whose outputs would all be truncated away are never computed; as in the authors' code, when in > out the inputs
  beyond ⌈out/r̂⌉·r̂ get no update. Not a low-rank product: PEFT export refuses (use `lorakit merge`).
- "sharing" (type 1, for large r, paper Eq. 6): the chunks are summed, M is applied once, the r̂ outputs are tiled
  and truncated to `out`: ΔW = T·M·C with 0/1 matrices C (r̂×in) and T (out×r̂), so rank ≤ r̂; exported to PEFT
  as the exact rank-r̂ LoRA A = C, B = T·M (per-module ranks go to rank_pattern).

MoRA has no scale: alpha and rslora are ignored (the authors fix scaling at 1.0; their README: "MoRA does not use
lora_alpha"). The forward never builds ΔW and uses no gathers (index_select and its scatter backward were the
slowest part on CPU): the padded x is a view of x, or x concatenated with itself as often as needed; "rope" folds the rotation
into n per-chunk matrices M·R_c (n·r̂² work, so no rotated copy of the activations is made or kept for backward)
applied in one batched GEMM, "sharing" sums the chunks and applies M in one GEMM; the output is a slice or a
repeat. The cos/sin tables are non-persistent buffers: nothing but M is stored. Merge pushes the identity through
the same linear map (exact, O(in·n·r̂²) once). Learning rate: the authors use LoRA's
(3e-4 for r=8 fine-tuning, 5e-4 for pre-training with r=128).
"""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import ConfigError
from ..layer import AdapterLayer
from ..options import Option
from . import register_method

KINDS = ("rope", "sharing")
ROPE_BASE = 10000.0
IDENTITY_BLOCK = 2048  # rows of the identity pushed through the update at once when merging (bounds memory)


def mora_rank(in_features: int, out_features: int, r: int, kind: str) -> int:
    """r̂: the side of M, so that r̂² ≈ r·(in + out); even for "rope" (RoPE rotates pairs)."""
    rank = int(math.sqrt((in_features + out_features) * r) + 0.5)
    return rank // 2 * 2 if kind == "rope" else rank


@register_method
class MoraLayer(AdapterLayer):
    method = "mora"
    init_ignored = "its one trained matrix M starts at zero"
    trainable = ("M",)
    stored = ("M",)
    options = {
        "kind": Option("rope", str, "rope (RoPE-rotated chunks, high rank) or sharing (summed chunks)", KINDS),
    }

    @classmethod
    def check_config(cls, config):
        ignored = [f"alpha={config.alpha:g}"] if config.alpha != config.r else []
        ignored += ["rslora"] if config.rslora else []
        if ignored:
            # stacklevel 4: check_config <- AdapterConfig.__post_init__ <- the dataclass __init__ <- the caller
            warnings.warn(f"mora ignores {' and '.join(ignored)}: its update is not scaled (scale 1)", stacklevel=4)

    @classmethod
    def check_layer(cls, config, name, in_features, out_features):
        if config.option("kind") == "rope" and mora_rank(in_features, out_features, config.r, "rope") < 2:
            raise ConfigError(
                f"r={config.r} is too small for mora kind=rope on {name} ({in_features} -> {out_features}): "
                "r̂ would be 0; use a larger r or kind=sharing"
            )

    @classmethod
    def stored_shapes(cls, config, in_features, out_features):
        rank = mora_rank(in_features, out_features, config.r, config.option("kind"))
        return {"M": (rank, rank)}

    def build(self) -> None:
        self.scale = 1.0  # alpha is ignored (see the module docstring)
        self.kind = self.option("kind")
        rank = self.rank_hat = mora_rank(self.in_features, self.out_features, self.r, self.kind)
        self.M = self.new_parameter(torch.zeros(rank, rank))
        chunks = math.ceil(self.in_features / rank)
        if self.kind == "rope":  # chunks whose outputs all lie beyond `out` are truncated away: skip them
            chunks = min(chunks, math.ceil(self.out_features / rank))
        self.chunks = chunks
        self.padded = chunks * rank  # features of the wrapped-around x_pad, x_pad[i] = x[i mod in]
        if self.kind == "rope":
            self._build_rotation()

    def _build_rotation(self) -> None:
        """RoPE_c(v) = v ⊙ cos_c + rotate_half(v) ⊙ sin_c, rotate_half(v) = [−v_hi, v_lo] (HF layout), chunk c at
        position c. Tables: cos (n × r̂) and sin with rotate_half's sign folded in, [−sin_lo, sin_hi]."""
        rank, half = self.rank_hat, self.rank_hat // 2
        inv_freq = ROPE_BASE ** (-torch.arange(0, rank, 2, dtype=torch.float64) / rank)
        angles = torch.outer(torch.arange(self.chunks, dtype=torch.float64), inv_freq).repeat(1, 2)  # n x r̂
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(torch.float64)
        weight = self.base_layer.weight
        for name, table in (("cos", angles.cos()), ("sin", angles.sin() * sign)):
            self.register_buffer(name, table.to(device=weight.device, dtype=self.factor_dtype), persistent=False)

    def chunk_matrices(self) -> torch.Tensor:
        """M·R_c for each chunk c (n × r̂ × r̂): y_c = M·RoPE_c(x_c) = (M·R_c)·x_c. Column k of M·R_c is
        M[:, k]·cos_c[k] + M[:, k']·sin_c[k'] (sign folded in) with k' = k ± r̂/2, the feature rotate_half moves to k."""
        m = self.M
        cos, sin = self.cos.to(m.dtype), self.sin.to(m.dtype)
        return m * cos[:, None, :] + (m * sin[:, None, :]).roll(self.rank_hat // 2, dims=-1)

    def _pad(self, h: torch.Tensor) -> torch.Tensor:
        """x_pad (..., n·r̂), x_pad[i] = h[i mod in]: a view when n·r̂ <= in, else h concatenated with its head."""
        if self.padded <= self.in_features:
            return h[..., : self.padded]
        copies, rest = divmod(self.padded, self.in_features)
        return torch.cat([h] * copies + ([h[..., :rest]] if rest else []), dim=-1)

    def initialize(self) -> None:
        with torch.no_grad():
            self.M.zero_()  # ΔW = 0 at init, as in the authors' code (M is the only trained tensor)

    def update(self, h: torch.Tensor) -> torch.Tensor:
        """ΔW·h for h (..., in) in the factors' dtype; linear in h, so merging pushes the identity through it."""
        chunks = self._pad(h).unflatten(-1, (self.chunks, self.rank_hat))  # (..., n, r̂)
        if self.kind == "rope":
            y = torch.einsum("...cr,csr->...cs", chunks, self.chunk_matrices()).flatten(-2)  # batched over chunks
        else:
            y = chunks.sum(-2) @ self.M.T
        # decompression: y (n·r̂ values for rope, r̂ for sharing) truncated to `out`, or repeated then truncated
        if self.out_features <= y.shape[-1]:
            return y[..., : self.out_features]
        copies = -(-self.out_features // y.shape[-1])
        return y.repeat(*(1,) * (y.dim() - 1), copies)[..., : self.out_features]

    def add_update(self, out, x):
        h = self.dropout(x) if self.dropout is not None else x
        if h.dtype != self.M.dtype:
            h = h.to(self.M.dtype)
        return out + self.update(h).to(out.dtype)

    def delta_linear(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=self.M.dtype, device=self.M.device)
        columns = [self.update(eye[i : i + IDENTITY_BLOCK]) for i in range(0, self.in_features, IDENTITY_BLOCK)]
        return torch.cat(columns).T.contiguous()  # row i of the stack is ΔW e_i: the stack is ΔWᵀ

    def export_factors(self):
        if self.kind == "rope":
            return None  # block-diagonal, rank up to min(in, out): no exact low-rank form
        rank, m = self.rank_hat, self.M.detach()
        compress = torch.zeros(rank, self.in_features, dtype=m.dtype, device=m.device)  # C: chunk sums
        positions = torch.arange(self.padded, device=m.device)  # x_pad[p] = x[p mod in] lands in row p mod r̂
        ones = torch.ones(self.padded, dtype=m.dtype, device=m.device)
        compress.index_put_((positions % rank, positions % self.in_features), ones, accumulate=True)
        tile = torch.arange(self.out_features, device=m.device) % rank
        return compress, m.index_select(0, tile)  # A = C, B = T·M (rows of M tiled)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind}, r_hat={self.rank_hat}"
