"""LoRA-XS: Bałazy, Banaei, Aberer, Tabor, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of
Parameters", arXiv:2405.17604.

One trained r × r matrix between frozen factors from the top-r SVD of the frozen weight W (out × in):

    W ≈ U_r Σ_r V_rᵀ (top r singular triplets),   ΔW = s · U_r R Σ_r V_rᵀ,   R ∈ R^{r×r} trained, s = alpha / r

so a layer trains r² parameters whatever its size. Σ_r sits on the input side as in the authors' code: in
`find_and_initialize` (MohammadrezaBanaei/LoRA-XS, utils/initialization_utils.py) the SVD is taken of Wᵀ, lora_A
becomes Σ_r V_rᵀ, lora_B becomes U_r, and R is the r × r `default_lora_latent_mapping` between them (the paper
writes x W + x A R B with x on the left: the same update, transposed). Default alpha = r (s = 1) is the authors'
setting for math and instruction tuning (main_math_tuning.py, learning rate 4e-3); their GLUE runs use alpha 16.
Option `r_init` (`AdapterConfig.extra`):

- "zeros" (default): R = 0, so the output is unchanged at init; R's gradient is not zero (U_r, Σ_r V_rᵀ ≠ 0).
- "normal": R ~ N(0, (1e-5)²), the authors' init (`init_module_weights(..., sigma=0.00001)`), drawn from the
  generator seeded by (seed, module name, "R"): the output moves by ~1e-5 relative at init.

Only R is stored. U_r and A = Σ_r V_rᵀ are non-persistent buffers recomputed from the base weight whenever the
layer is built (adapt, load), so an adapter must be loaded onto its exact original base. adapter.json keeps, per
module, the row of each u_i's largest entry ("sign_anchors"); a load sets each pair's sign by u_i[anchor_i] > 0, so
that a base rounded to another dtype, where two entries of nearly equal magnitude can swap places and the canonical
rule would flip a pair, keeps the trained signs (fp32 -> bf16 on a tiny Llama: the update moved by 165% without,
0.6% with). The rebuilt update is checked against a sketch the file keeps (`lorakit.fingerprint`; under Chain of
LoRA and XGBLoRA, whose later links take the SVD of W + ΣΔW, the procedure keeps it beside its links). The forward is LoRA's
fused path with (A, B) = (Σ_r V_rᵀ, U_r R); merge and PEFT export (a rank-r LoRA) use the same factors.

The SVD (`top_singular`), computed from W in float32 (half precision upcast; float64 for a float64 W). The
authors take a dense `torch.linalg.svd` (utils/initialization_utils.py) or sklearn's randomized
`TruncatedSVD(n_iter=10)` (utils/svd_utils.py), which misses the top-r subspaces by ~5e-3 (sine of the largest
principal angle) even on a random 64 × 64 weight. lorakit aims at ≤ 1e-4:

- min(in, out) ≤ 256 or r > min(in, out) / 8: a dense float64 SVD (the cheaper one there);
- otherwise block Lanczos bidiagonalisation (Golub-Kahan) with full reorthogonalisation: blocks of 4 vectors
  from a fixed-seed start (small blocks need fewer products on the flat spectra of LLM weights), float32 products
  and float64 bases. Near convergence the right space of the top-k Ritz vectors is refined by a Rayleigh-Ritz
  step with float64 products (float32 round-off would otherwise mix u_r and u_{r+1}, whose singular values are
  often within 1e-4 relative in LLM weights). It stops when, with Ritz triplets (σ_i, u_i, v_i), residuals
  ρ_i = ‖(W v_i − σ_i u_i, Wᵀ u_i − σ_i v_i)‖ and σ̂ = σ_{k+1} + ρ_{k+1} (a bound on the exact σ_{k+1}), for some
  cluster size k ≥ r

      ‖(ρ_i / (σ_i − σ̂))_{i≤r}‖  +  ‖(ρ_i / (σ_i − σ̂))_{i≤k}‖ · ‖(ρ_i / (σ_i − σ_{r+1}))_{i≤r}‖  ≤  5e-5

  (leakage beyond the k-cluster, plus the second-order leakage to u_{r+1..k} inside it), a bound on the sine of
  the largest angle to the exact subspaces; 10-100x above the true error in practice. Without convergence by
  min(in, out) / 2 vectors it falls back to the dense SVD. Not caught: a cluster of more than 4 (near-)equal
  singular values above σ_r that the start block misses entirely (improbable from a random start).

Signs are canonical (each column of U_r has its largest-magnitude entry positive; V_r flips with it), so the
factors depend on the weight only, up to float32 round-off, whatever the thread count. Costs and accuracy against
the dense and the authors' SVD: benchmarks/bench_loraxs_init.py.
"""

from __future__ import annotations

import math

import torch

from .. import random as lk_random
from ..errors import ConfigError
from ..layer import AdapterLayer
from ..options import Option
from . import register_method

R_INITS = ("zeros", "normal")
NORMAL_STD = 1e-5  # the authors' sigma for R
DENSE_MAX = 256  # min(in, out) up to which the dense float64 SVD is the cheaper one (measured)
TOLERANCE = 5e-5  # stop bound on the sine of the largest principal angle (the requirement is 1e-4)
BLOCK = 4


@register_method
class LoraXSLayer(AdapterLayer):
    method = "loraxs"
    init_ignored = "its frozen factors come from the frozen weight's SVD, and R starts as the r_init option says"
    trainable = ("R",)
    stored = ("R",)
    derives_from_links = True
    options = {
        "r_init": Option("zeros", str, "init of the trained r x r matrix R: zeros or normal (std 1e-5)", R_INITS),
    }

    @classmethod
    def check_layer(cls, config, name, in_features, out_features):
        if config.r > min(in_features, out_features):
            raise ConfigError(
                f"r={config.r} is too large for loraxs on {name} ({in_features} -> {out_features}): it needs r "
                f"singular vectors; use r <= {min(in_features, out_features)} or exclude the module"
            )

    @classmethod
    def stored_shapes(cls, config, in_features, out_features):
        return {"R": (config.r, config.r)}

    def build(self) -> None:
        self.R = self.new_parameter(torch.zeros(self.r, self.r))
        self.rederive()

    def rederive(self) -> None:
        """U_r, σ_r and Σ_r V_rᵀ of the weight (W, or W + ΣΔW under Chain of LoRA / XGBLoRA)."""
        u, s, v = top_singular(self.init_weight_linear(), self.r)
        for name, tensor in (("U", u), ("S", s), ("SVt", s[:, None] * v.T)):  # U_r, σ_r, A = Σ_r V_rᵀ
            weight = self.base_layer.weight
            self.register_buffer(name, tensor.to(weight.device, self.factor_dtype).contiguous(), persistent=False)
        self.sign_anchors = u.abs().argmax(0).tolist()  # the row of each u_i's largest entry (kept in files)

    def file_fields(self):
        return {"sign_anchors": self.sign_anchors}

    @torch.no_grad()
    def load_file_fields(self, fields):
        """Signs from the file's anchors: u_i[anchor_i] > 0. On the same base that is the canonical rule; on a
        rounded base (another dtype) the largest entry can change places, the anchored one keeps its sign."""
        anchors = fields.get("sign_anchors")
        if anchors is None:  # a file of an earlier version: the canonical rule of `top_singular`
            return
        if not (
            isinstance(anchors, list)
            and len(anchors) == self.r
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.out_features for i in anchors)
        ):
            raise ValueError(f"sign_anchors must be {self.r} row indices below {self.out_features}")
        signs = self.U[anchors, torch.arange(self.r)].sign()
        signs[signs == 0] = 1
        self.U.mul_(signs)
        self.SVt.mul_(signs[:, None])
        self.sign_anchors = list(anchors)

    def initialize(self) -> None:
        with torch.no_grad():
            if self.option("r_init") == "normal":
                gen = lk_random.generator(self.config.seed, self.name, "R")
                self.R.copy_(lk_random.gaussian(self.r, self.r, gen, std=NORMAL_STD))
            else:
                self.R.zero_()

    def factors(self):
        return self.SVt, self.U @ self.R

    def recomputed_factors(self):
        return self.factors()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_init={self.option('r_init')}"


def top_singular(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, σ_r, V_r): the top-r singular triplets of `weight` (out × in) in float64, with canonical signs."""
    m, n = weight.shape
    w = weight.detach()
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    if not w.any():  # no singular directions to find (ΔW stays 0): skip the iterations and the dense fallback
        eye = dict(dtype=torch.float64, device=w.device)
        return torch.eye(m, r, **eye), torch.zeros(r, **eye), torch.eye(n, r, **eye)
    result = None
    if min(m, n) > DENSE_MAX and r <= min(m, n) // 8:
        result = _block_lanczos(w, r)
    if result is None:
        u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
        result = u[:, :r], s[:r], vh[:r].T
    u, s, v = result
    signs = u.gather(0, u.abs().argmax(0, keepdim=True)).sign()
    signs[signs == 0] = 1
    return (u * signs).contiguous(), s.contiguous(), (v * signs).contiguous()


def _orthonormalize(x: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Qᵀ, R) with Q R the QR factorisation of xᵀ after the row space of `basis` (orthonormal rows) is projected out
    of x's rows twice (classical Gram-Schmidt with reorthogonalisation)."""
    for _ in range(2):
        x = x - (x @ basis.T) @ basis
    q, r = torch.linalg.qr(x.T)
    return q.T, r


def _refine(w: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Rayleigh-Ritz on the right space spanned by v (orthonormal columns) with float64 products, W upcast a block
    of rows at a time: (u, σ, v) and the residuals ‖Wᵀ u_i − σ_i v_i‖ (W v_i = σ_i u_i holds by construction)."""
    z = torch.empty(w.shape[0], v.shape[1], dtype=torch.float64, device=w.device)
    wtz = torch.zeros_like(v)  # Wᵀ W v, accumulated in the same pass over W
    rows = max(1, (1 << 22) // w.shape[1])
    for i in range(0, w.shape[0], rows):
        block = w[i : i + rows].to(torch.float64)
        z[i : i + rows] = block @ v
        wtz += block.T @ z[i : i + rows]
    u, s, yt = torch.linalg.svd(z, full_matrices=False)
    s = s.clamp_min(torch.finfo(torch.float64).tiny)
    v = v @ yt.T
    return u, s, v, (wtz @ yt.T / s - v * s).norm(dim=0)


def _estimate(s: torch.Tensor, rho: torch.Tensor, r: int) -> tuple[float, int]:
    """The bound of the module docstring from Ritz values s and residuals rho (descending), and its best k."""
    if s[r - 1] <= s[r]:
        return math.inf, r
    split = (rho[:r] / (s[:r] - s[r])).norm()  # ρ_i / (σ_i − σ_{r+1}): in-cluster leakage per unit of ε_k
    best = (math.inf, r)
    for k in range(r, len(s) - 1):
        gaps = s[:k] - (s[k] + rho[k])  # σ_i − σ̂_{k+1}, σ̂_{k+1} ≥ the exact σ_{k+1} once ρ_{k+1} is small
        if gaps.min() > 0:
            far = (rho[:r] / gaps[:r]).norm()
            near = (rho[:k] / gaps).norm() * split if k > r else 0.0
            best = min(best, (float(far + near), k))
    return best


def _block_lanczos(w: torch.Tensor, r: int) -> tuple[torch.Tensor, ...] | None:
    """Top-r triplets by block Lanczos bidiagonalisation, refined in float64; None if not converged."""
    m, n = w.shape
    b, limit = BLOCK, min(m, n) // 2 // BLOCK * BLOCK
    f64 = dict(dtype=torch.float64, device=w.device)
    # Vectors and their products are stored as rows (each block contiguous), in buffers grown by doubling:
    # bases U, V (orthonormal), (W V)ᵀ (float32 products) and T = Uᵀ W V.
    ut, vt, wvt, t = (torch.zeros(0, size, **f64) for size in (m, n, m, 0))
    gen = torch.Generator().manual_seed(0)  # fixed: the factors depend on the weight only
    v, _ = _orthonormalize(torch.randn(b, n, generator=gen, dtype=torch.float64).to(w.device), vt)
    k, check = 0, max(4 * r, 2 * r + 2)  # Ritz triplets up to r + 1 need at least 2r + 2 vectors
    while k + b <= limit:
        if k + b > ut.shape[0]:
            grow = min(limit, max(2 * ut.shape[0], 8 * r)) - ut.shape[0]
            ut, vt, wvt = (torch.cat([x, x.new_zeros(grow, x.shape[1])]) for x in (ut, vt, wvt))
            t = torch.nn.functional.pad(t, (0, grow, 0, grow))
        vt[k : k + b] = v
        wvt[k : k + b] = v.to(w.dtype) @ w.T
        ut[k : k + b], _ = _orthonormalize(wvt[k : k + b], ut[:k])
        t[k : k + b, : k + b] = ut[k : k + b] @ wvt[: k + b].T
        t[:k, k : k + b] = ut[:k] @ wvt[k : k + b].T
        k += b
        # Wᵀ U_last leaves span(V) by the next block: Wᵀ U = V Tᵀ + v_next · beta-part (Lanczos relation)
        v, beta = _orthonormalize((ut[k - b : k].to(w.dtype) @ w).double(), vt[:k])
        if k >= check or k + b > limit:
            check = k + max(b, k // 4)  # a check costs O(k³): at geometric intervals
            result = _ritz(w, vt[:k], t[:k, :k], beta, r)
            if result is not None:
                return result
    return None


def _ritz(w, vt, t, beta, r: int) -> tuple[torch.Tensor, ...] | None:
    """Rayleigh-Ritz on the Krylov bases; once the bound is near the tolerance, the right space of the top-k cluster
    is refined with float64 products (float32 round-off in T would leave ~u·‖W‖ / (σ_r − σ_{r+1}) in the split)."""
    kmax = min(t.shape[0] // 2, 2 * r) + 1  # triplets whose residuals are inspected
    lam, y = torch.linalg.eigh((t.T @ t).cpu())  # ascending; cheaper than an SVD of t
    y = y.flip(1)[:, :kmax].to(t.device)
    s = lam.flip(0)[:kmax].clamp_min(torch.finfo(torch.float64).tiny).sqrt().to(t.device)
    # Ritz pair (σ, u = U c, v = V y), c = T y / σ: W v = σ u, and Wᵀ u − σ v = v_next · beta · c_last
    rho = (beta @ (t[-beta.shape[0] :] @ y / s)).norm(dim=0)
    bound, k = _estimate(s, rho, r)
    if bound > 2 * TOLERANCE:
        return None
    u, s, v, rho = _refine(w, vt.T @ y[:, : k + 2])
    bound, _ = _estimate(s, rho, r)
    return (u[:, :r], s[:r], v[:, :r]) if bound <= TOLERANCE else None
