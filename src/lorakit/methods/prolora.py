"""PRoLoRA: Wang et al., "PRoLoRA: Partial Rotation Empowers More Parameter-Efficient LoRA", arXiv:2402.16902.

A LoRA of rank r whose first R = r − u ranks are built from small trained chunks broadcast along the hidden axes
and rotated along the rank axis; the last u ranks are plain LoRA ("partially-sharing refinement"):

    ΔW = B A,   A = [A_s ; A_u] ∈ R^{r×in},   B = [B_s , B_u] ∈ R^{out×r},   y = W x + s · B A x
    A_s = [roll(A0, 0) | roll(A0, s_A) | … | roll(A0, (m−1)·s_A)][:, :in]        A0 ∈ R^{R×⌈in/m⌉}
    B_s = [roll(B0, 0) ; roll(B0, s_B) ; … ; roll(B0, (n−1)·s_B)][:out, :]       B0 ∈ R^{⌈out/n⌉×R}
    roll(X, t): rank index i of the chunk is rank (i + t) mod R of X, i.e. torch.roll(X, −t, rank axis)
    s_A = max(⌊R/m⌋, 1),   s_B = max(⌊R/n⌋, 1)

Trainable parameters per layer: R·(⌈in/m⌉ + ⌈out/n⌉) + u·(in + out); rank(ΔW) ≤ r. Options (`AdapterConfig.extra`):
`unshared` = u (0 ≤ u ≤ r; u = r is plain LoRA), `share_a` = m, `share_b` = n (≥ 1; m = n = 1, u = 0 is LoRA).

Checked against the authors' code, Forence1999/PRoLoRA `modules/chunkwise_sharing_LoRA.py`:
- layout and rotation: `de_reduce` repeats the (R × ⌈in/m⌉) chunk m times, gathers rank row (i + k·shift) mod R
  for chunk k, concatenates the chunks along the hidden axis, truncates to `in` and appends the u unshared rows
  after the shared ones; B goes through the same function transposed. Exactly the formulas above.
- strides: `gen_chunkwise_sharing_lora_config` sets them to max(⌊(r − u)/m⌋, 1) and max(⌊(r − u)/n⌋, 1), with the
  shared rank r − u (not r); the paper's Figure 1 (r=4, u=1, m=2, n=3: both strides 1) agrees.
- rectified init (`LoraLayer_reset_lora_parameters`): A0 and A_u Kaiming-uniform(a=√5) with fan = in, the full
  width, not the chunk width ⌈in/m⌉: both ~ U(±1/√in), so the broadcast A has LoRA's scale. B0 = B_u = 0.
- u = r (R = 0) returns the unshared part alone: plain LoRA, kept here (without A0, B0; u = 0 has no A_u, B_u).
Their code adapts bitsandbytes 4-bit layers only and cannot merge; here merge, unmerge and the PEFT export (a plain
rank-r LoRA, A and B as built) come from `AdapterLayer` through `factors()`. init="gaussian" draws A0, A_u from
N(0, (1/r)²), as LoRA's gaussian init.

Defaults u = 1, m = n = 2: the paper's Figure 1 keeps one unshared rank; the authors' scripts tie n to m
(ft_llama2_7b_*.sh pass one value to both); and m = n = 2 gives about half of LoRA's parameters at the same r
(r = 8 on 576 → 1536: 56%), the budget of the paper's headline claim ("with one time less trainable parameters,
PRoLoRA still outperforms LoRA"). The defaults hold for any r (r = 1: u = r, a plain LoRA).
The paper's Figure 1 draws A_u above A_s (B_u left of B_s); the order does not change ΔW: the code's is kept.

`factors()` builds A and B on every call with one `index_select` and one `cat` each: O(r·(in + out)) memory
traffic against the O(T·r·(in + out)) of the token GEMMs. The gather order (rank, chunk, column) makes the gathered
tensor a contiguous R × (chunks·⌈in/m⌉) matrix without a transpose copy; chunks wholly past `in` are not gathered.
"""

from __future__ import annotations

import math

import torch

from .. import random as lk_random
from ..errors import ConfigError
from ..layer import AdapterLayer
from ..options import Option
from . import register_method


def chunk_width(features: int, share: int) -> int:
    """Width of the trained chunk: ⌈features / share⌉."""
    return math.ceil(features / share)


def stride(shared_rank: int, share: int) -> int:
    """The authors' base rotation stride max(⌊(r − u)/share⌋, 1)."""
    return max(shared_rank // share, 1)


def rank_index(shared_rank: int, share: int, features: int) -> torch.Tensor:
    """Rows of the chunk to gather, in (rank i, chunk k) order: (i + k·stride) mod R, flattened.

    Only the chunks that reach into `features` are listed (those past it would be truncated away).
    """
    if shared_rank == 0:  # u = r: nothing is shared
        return torch.zeros(0, dtype=torch.long)
    chunks = math.ceil(features / chunk_width(features, share))
    ranks = torch.arange(shared_rank).unsqueeze(1)
    shifts = torch.arange(chunks).unsqueeze(0) * stride(shared_rank, share)
    return ((ranks + shifts) % shared_rank).flatten()


def broadcast(chunk: torch.Tensor, index: torch.Tensor, features: int) -> torch.Tensor:
    """R × features matrix from an R × c chunk: the rotated copies side by side, truncated to `features`."""
    # index is in (rank i, chunk k) order, so row i of the view holds chunk rows index[i, 0], index[i, 1], ...
    wide = chunk.index_select(0, index).view(chunk.shape[0], -1)
    return wide if wide.shape[1] == features else wide[:, :features]


def uniform(rows: int, cols: int, bound: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(rows, cols, generator=gen, dtype=torch.float32).mul_(2 * bound).sub_(bound)


@register_method
class ProloraLayer(AdapterLayer):
    method = "prolora"
    trainable = ("A0", "B0", "A_u", "B_u")  # narrowed per instance in build() where u = 0 or u = r
    stored = ("A0", "B0", "A_u", "B_u")
    options = {
        "unshared": Option(1, int, "u: ranks kept unshared (plain LoRA), at most r; u = r is plain LoRA", minimum=0),
        "share_a": Option(2, int, "m: chunks of A along the input axis that share one rotated chunk", minimum=1),
        "share_b": Option(2, int, "n: chunks of B along the output axis that share one rotated chunk", minimum=1),
    }

    @classmethod
    def check_config(cls, config):
        unshared = config.option("unshared")
        if unshared > config.r:
            raise ConfigError(
                f"option unshared={unshared} of prolora is invalid; use an integer <= r={config.r} "
                f"(unshared=r is plain LoRA)"
            )

    @classmethod
    def stored_shapes(cls, config, in_features, out_features):
        """Only the non-empty tensors: u = 0 has no A_u, B_u and u = r no A0, B0 (files keep no empty tensors)."""
        unshared = config.option("unshared")
        shared = config.r - unshared
        shapes = {
            "A0": (shared, chunk_width(in_features, config.option("share_a"))),
            "B0": (chunk_width(out_features, config.option("share_b")), shared),
            "A_u": (unshared, in_features),
            "B_u": (out_features, unshared),
        }
        return {name: shape for name, shape in shapes.items() if all(shape)}

    def build(self) -> None:
        self.unshared = self.option("unshared")
        self.shared_rank = self.r - self.unshared
        self.share_a, self.share_b = self.option("share_a"), self.option("share_b")
        shapes = self.stored_shapes(self.config, self.in_features, self.out_features)
        self.trainable = self.stored = tuple(shapes)  # per instance: depends on u (see stored_shapes)
        for name, shape in shapes.items():
            setattr(self, name, self.new_parameter(torch.zeros(shape)))
        device = self.base_layer.weight.device
        index_a = rank_index(self.shared_rank, self.share_a, self.in_features)
        index_b = rank_index(self.shared_rank, self.share_b, self.out_features)
        self.register_buffer("index_a", index_a.to(device), persistent=False)  # not stored: derived from options
        self.register_buffer("index_b", index_b.to(device), persistent=False)

    def initialize(self) -> None:
        seed, name = self.config.seed, self.name
        bound = 1.0 / math.sqrt(self.in_features)  # rectified: fan = in for A0 too, not its width ⌈in/m⌉
        with torch.no_grad():
            for purpose in self.trainable:
                param = getattr(self, purpose)
                if purpose in ("B0", "B_u"):
                    param.zero_()  # ΔW = 0 at init
                elif self.config.init == "gaussian":
                    gen = lk_random.generator(seed, name, purpose)
                    param.copy_(lk_random.gaussian(*param.shape, gen, std=1.0 / self.r))
                else:
                    param.copy_(uniform(*param.shape, bound, lk_random.generator(seed, name, purpose)))

    def factors(self):
        if not self.shared_rank:
            return self.A_u, self.B_u
        a = broadcast(self.A0, self.index_a, self.in_features)
        b_t = broadcast(self.B0.T, self.index_b, self.out_features)  # Bᵀ: built as A, from B0ᵀ
        if self.unshared:
            a = torch.cat([a, self.A_u])
            b_t = torch.cat([b_t, self.B_u.T])
        return a, b_t.T

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, unshared={self.unshared}, share_a={self.share_a}, share_b={self.share_b}"
