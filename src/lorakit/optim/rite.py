"""LoRA-RITE: Yen et al., "LoRA Done RITE: Robust Invariant Transformation Equilibration for LoRA Optimization",
arXiv:2410.20625 (ICLR 2025). An adaptive matrix preconditioner whose update of ΔW = B·A does not depend on how ΔW
is factored: (S⁻¹A, B·S) for any invertible r×r S gives the same ΔW at every step (Adam's does not).

Notation (the paper's, in "tall" layout, rank axis last): F_A = Aᵀ (in×r), F_B = B (out×r), so ΔW = F_B·F_Aᵀ and
the gradient of each factor is ∇_A = Gᵀ·F_B, ∇_B = G·F_A for G = ∂L/∂ΔW (times the layer's scale s). For a factor
X with partner Y (A↔B), every step, all with the partner's magnitude removed (paper, Algorithm 1):

    F_X = U_X R_X                                   thin QR (A: QR of Aᵀ); R⁺ a pseudo-inverse, since B = 0 at init
    ḡ_X = ∇_X · R_Y⁺                                unmagnified gradient = Gᵀ U_B (for A): invariant up to a rotation
    ḡ_X ← 0 if RMS(ḡ_X) > skip_rms                  update skipping, per factor (the authors' code)
    ḡ ← ḡ · min(1, clip_norm / ‖ḡ‖)                 one global norm over every factor of the model
    P_X = U_Yᵀ U_Y,prev                             the partner's basis change since the last step
    V̄_X = β̂₂ · P_X V̄_X Pᵀ_X + (1 − β̂₂) · ḡᵀḡ / n     second moment, r×r, carried into the new basis
    ρ_X = β̂₂ · (ρ_X + d_λ(V̄_prev, P V̄_prev Pᵀ))     escaped mass (option): d_λ = max_i λ_i(V̄) − λ_i(PV̄Pᵀ) ≥ 0
    S̄_X = ḡ_X · E diag(1 / (√(λ + ρ) + eps)) Eᵀ      (V̄_X + ρI)^(−1/2) by eigh, eps = 1e-6 as the authors
    M̄_X = β̂₁ · M̄_X Pᵀ_X + (1 − β̂₁) · S̄_X            first moment of the preconditioned step, also carried by P
    M̄_X ← M̄_X / max(1, RMS(M̄_X) / update_cap)       update capping (option)
    F_X ← F_X − lr · (M̄_X R_Y⁺ᵀ + wd · F_X)          the partner's magnitude restored

β̂ is Adafactor's bias-corrected decay β(1 − β^(t−1)) / (1 − β^t) (Shazeer & Stern 2018, §7.1), so the first step
uses the gradient alone and no separate bias correction is needed. Why it is invariant: with (S⁻¹A, B·S) the bases
become U·O for an orthogonal O, ḡ → ḡO, V̄ → OᵀV̄O, S̄ → S̄O, M̄ → M̄O, and M̄R⁺ᵀ moves the factors by exactly the S
that relates them, so the two runs keep ΔW equal. The global norm, the RMS tests and the eigenvalues are rotation
invariant; decoupled weight decay on the factors is not (hence the warning).

Pairs: every adapter layer's trained (A, B) — LoRA, OLoRA (ΔW = BA − B0A0 with B0A0 frozen) — and LoRA-Mini's
(A_in, B_in): ΔW = B_out (B_in A_in) A_out, and the inner product Z = B_in·A_in is itself a rank-r LoRA in the
(a, b) coordinates, so the same invariance holds for (S⁻¹A_in, B_in·S). Layers training anything else (MoRA's M,
LoRTA's shared tensors) and trainable parameters outside the pairs are refused with a ConfigError: the optimizer is
RITE only, never a silent mix with Adam.

State (all in `self.state`, per factor, so state_dict / load_state_dict resume exactly): `step` (0-d tensor on the
parameter's device), `exp_avg` (M̄, the factor's shape), `exp_avg_sq` (V̄, r×r), `basis` (U of the last step, the
factor's shape) and `escaped` (ρ). One param group per pair, [A, B], with the layer's name. lr and weight_decay
are read per group (schedulers work as usual); the other options are optimizer-wide (the first group's).

Batching: the factors of one tall shape (n, r) are stacked for one batched QR and one bmm per product, and the r×r
algebra (pinv, eigh) runs once over every factor of the same rank. No Python branch reads a tensor value: skipping
and clipping are `torch.where` / `clamp` arithmetic (the linear-algebra kernels themselves may check their status).

Differences from the authors' PyTorch port (github.com/gkevinyen5418/LoRA-RITE, lora_rite.py): the state lives in
`self.state` (theirs in a namespace object that state_dict cannot save); pairs come from the adapter layers, not
from the order of a parameter list; a non-finite unmagnified gradient counts as skipped (their `>` test lets NaN
through); eigenvalues are clamped at 0 before the square root (theirs can take √ of a rounding-negative value and
then zero the NaN); d_λ is the paper's max eigenvalue drop (theirs also caps it by the trace drop, which is never
smaller); their unused options (relative epsilon, balance_param) are left out.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..inject import adapter_layers

PAIR_NAMES = (("A", "B"), ("A_in", "B_in"))  # (r × n_a, n_b × r) trained factor pairs of the known methods


def factor_pairs(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(layer name, A, B) of every adapter layer; ConfigError for anything LoraRite cannot optimize."""
    pairs = []
    for name, layer in adapter_layers(model):
        params = layer.trainable_parameters()
        names = next((pair for pair in PAIR_NAMES if set(pair) == set(params)), None)
        if names is None:
            trained = ", ".join(sorted(params)) or "only tensors shared by all layers"
            raise ConfigError(
                f"LoraRite needs one (A, B) factor pair per adapter layer, but method {layer.method!r} trains "
                f"{trained} in {name}; use torch.optim.AdamW for {layer.method}"
            )
        a, b = params[names[0]], params[names[1]]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] > min(a.shape[1], b.shape[0]):
            raise ConfigError(
                f"LoraRite: {name} has factors {tuple(a.shape)} and {tuple(b.shape)}; it needs A: r×n_a, B: n_b×r "
                f"with r <= n_a and r <= n_b"
            )
        pairs.append((name, a, b))
    if not pairs:
        raise ConfigError("the model has no lorakit adapters; call lorakit.adapt(model, config) first")
    paired = {id(p) for _, a, b in pairs for p in (a, b)}
    extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in paired]
    if extra:
        raise ConfigError(
            f"LoraRite optimizes only adapter (A, B) pairs, but {extra[0]} is trainable too ({len(extra)} such "
            f"parameters); freeze them or give them their own optimizer"
        )
    return pairs


def _decay(step: torch.Tensor, beta: float) -> torch.Tensor:
    """Adafactor's bias-corrected decay for a 0-based step count (0 at the first step)."""
    t = step + 1
    return beta * (1 - torch.pow(beta, t - 1)) / (1 - torch.pow(beta, t))


def _sym(x: torch.Tensor) -> torch.Tensor:
    return (x + x.mT) / 2


@dataclass
class _Factor:
    param: nn.Parameter
    is_a: bool  # A is stored r × n: its tall form is the transpose
    group: dict

    def tall(self, t: torch.Tensor) -> torch.Tensor:
        return t.mT if self.is_a else t

    @property
    def grad(self) -> torch.Tensor:
        return self.param.grad if self.param.grad is not None else torch.zeros_like(self.param)


@dataclass
class _Slab:
    """Factors of one tall shape (n × r): one batched QR; rows start:stop of their rank group's r×r arrays."""

    factors: list[_Factor]
    start: int
    stop: int


@dataclass
class _RankGroup:
    """Every factor of one rank, dtype and device: the r×r algebra runs once for all of them."""

    factors: list[_Factor]  # in slab order
    slabs: list[_Slab]
    partner: torch.Tensor  # row of each factor's partner (A ↔ B), on the device
    dtype: torch.dtype  # compute dtype: float32 for half-precision factors


class LoraRite(torch.optim.Optimizer):
    """LoRA-RITE over every adapter pair of `model` (see the module docstring for the algorithm).

    lr: as Adam's for LoRA is a good start (the authors' PyTorch recipe sweeps 2e-4, 5e-4, 1e-3 at r=16).
    clip_norm: global norm of the unmagnified gradients (None: off). skip_rms: zero a factor's unmagnified gradient
    whose RMS exceeds it (None: off). update_cap: cap the RMS of each factor's step (None: off). escaped_mass: the
    paper's ρ term. weight_decay: decoupled, on the factors; > 0 breaks invariance (warned). batched=False runs
    every pair on its own (a reference path for tests).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        clip_norm: float | None = 1.0,
        skip_rms: float | None = 1.0,
        update_cap: float | None = None,
        escaped_mass: bool = False,
        *,
        batched: bool = True,
    ):
        beta1, beta2 = betas
        checks = [
            ("lr", lr, lr >= 0),
            ("betas", betas, 0 <= beta1 < 1 and 0 <= beta2 < 1),
            ("eps", eps, eps >= 0),
            ("weight_decay", weight_decay, weight_decay >= 0),
        ] + [(k, v, v is None or v > 0) for k, v in (("clip_norm", clip_norm), ("skip_rms", skip_rms))]
        checks.append(("update_cap", update_cap, update_cap is None or update_cap > 0))
        for key, value, ok in checks:
            if not ok:
                raise ConfigError(f"LoraRite: {key}={value!r} is invalid; see help(lorakit.optim.LoraRite)")
        if weight_decay > 0:
            warnings.warn(
                "LoraRite: weight_decay > 0 decays the factors A and B, which breaks LoRA-RITE's transformation "
                "invariance (the update then depends on how ΔW is factored)",
                stacklevel=2,
            )
        groups = [{"params": [a, b], "name": name} for name, a, b in factor_pairs(model)]
        defaults = dict(
            lr=lr,
            betas=(beta1, beta2),
            eps=eps,
            weight_decay=weight_decay,
            clip_norm=clip_norm,
            skip_rms=skip_rms,
            update_cap=update_cap,
            escaped_mass=escaped_mass,
        )
        super().__init__(groups, defaults)
        self.batched = batched
        self._plan_key = None
        self._plan: list[_RankGroup] = []

    # ----------------------------------------------------------------- state and layout
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch leaves `step` where it was saved (CPU); the decays are computed on the parameter's device
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

    def _init_state(self, factor: _Factor, dtype: torch.dtype) -> dict:
        p, state = factor.param, self.state[factor.param]
        if not state:
            r = p.shape[0] if factor.is_a else p.shape[1]
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(r, r, dtype=dtype, device=p.device)
            state["basis"] = torch.zeros(p.shape, dtype=dtype, device=p.device)  # U_prev = 0: P = 0 at step 1
            state["escaped"] = torch.zeros((), dtype=dtype, device=p.device)
        return state

    def _layout(self) -> list[_RankGroup]:
        """Rank groups and slabs of the pairs that have gradients; rebuilt only when that set changes, so the
        partner index is not copied to the device every step."""
        live = [g for g in self.param_groups if any(p.grad is not None for p in g["params"])]
        key = (self.batched,) + tuple(
            (id(a), id(b), a.device, a.dtype, a.shape, b.shape) for a, b in (g["params"] for g in live)
        )
        if key == self._plan_key:
            return self._plan
        by_rank = defaultdict(list)
        for group in live:
            a, b = group["params"]
            by_rank[(a.shape[0], a.dtype, a.device)].append(group)
        plan = []
        for (_, dtype, device), groups in by_rank.items():
            factors = [_Factor(p, is_a, g) for g in groups for p, is_a in zip(g["params"], (True, False))]
            by_shape = defaultdict(list)  # factor 2j is pair j's A, 2j + 1 its B
            for i, f in enumerate(factors):
                by_shape[f.tall(f.param).shape[0] if self.batched else i].append(i)
            order = [i for members in by_shape.values() for i in members]
            row = {i: k for k, i in enumerate(order)}
            slabs, start = [], 0
            for members in by_shape.values():
                slabs.append(_Slab([factors[i] for i in members], start, start + len(members)))
                start += len(members)
            partner = torch.tensor([row[i ^ 1] for i in order], device=device)
            compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            plan.append(_RankGroup([factors[i] for i in order], slabs, partner, compute))
        self._plan_key, self._plan = key, plan
        return plan

    # ----------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._layout()
        if not plan:
            return loss
        options = self.param_groups[0]
        first = [self._unmagnified(rg, options["skip_rms"]) for rg in plan]
        scale = None
        if options["clip_norm"] is not None:
            device = plan[0].factors[0].param.device
            norm = torch.stack([sq.to(device) for _, _, _, sq in first]).sum().sqrt()
            scale = options["clip_norm"] / norm.clamp(min=options["clip_norm"])  # 1 when under the limit
        for rg, (bases, grads, r_partner, _) in zip(plan, first):
            self._update(rg, bases, grads, r_partner, scale, options)
        return loss

    def _unmagnified(self, rg: _RankGroup, skip_rms: float | None):
        """QR bases and unmagnified gradients ḡ = ∇·R⁺_partner of a rank group, and their squared norm."""
        bases, rs, grads = [], [], []
        for slab in rg.slabs:
            x = torch.stack([f.tall(f.param) for f in slab.factors]).to(rg.dtype)
            q, r = torch.linalg.qr(x)
            bases.append(q)
            rs.append(r)
            grads.append(torch.stack([f.tall(f.grad) for f in slab.factors]).to(rg.dtype))
        # pinv, not inv: a zero B (LoRA's init) has R_B = 0, and then ḡ_A = 0 (as ∇_A = Bᵀ G is)
        r_partner = torch.linalg.pinv(torch.cat(rs))[rg.partner]
        squares = []
        for i, slab in enumerate(rg.slabs):
            g = grads[i] @ r_partner[slab.start : slab.stop]
            if skip_rms is not None:
                rms = g.square().mean(dim=(1, 2), keepdim=True).sqrt()
                g = torch.where(rms <= skip_rms, g, 0.0)  # NaN / inf compare False: skipped too
            grads[i] = g
            squares.append(g.square().sum())
        return bases, grads, r_partner, torch.stack(squares).sum()

    def _update(self, rg, bases, grads, r_partner, scale, options) -> None:
        beta1, beta2 = options["betas"]
        states = [self._init_state(f, rg.dtype) for f in rg.factors]
        steps = torch.stack([s["step"] for s in states])
        b1, b2 = _decay(steps, beta1)[:, None, None], _decay(steps, beta2)[:, None, None]
        turn, moment = [], []  # per slab: U_newᵀ U_prev of each factor, and ḡᵀḡ / n
        for slab, q, g in zip(rg.slabs, bases, grads):
            if scale is not None:
                g.mul_(scale)
            prev = torch.stack([s["basis"] for s in states[slab.start : slab.stop]])
            prev = prev.mT if slab.factors[0].is_a == slab.factors[-1].is_a == True else self._tall_stack(slab, prev)  # noqa: E712
            turn.append(q.mT @ prev.to(rg.dtype))
            moment.append(g.mT @ g / g.shape[1])
        p = torch.cat(turn)[rg.partner]  # a factor's moments live in its partner's basis
        v_prev = torch.stack([s["exp_avg_sq"] for s in states]).to(rg.dtype)
        v_turned = _sym(p @ v_prev @ p.mT)
        v = _sym(b2 * v_turned + (1 - b2) * torch.cat(moment))
        escaped = torch.stack([s["escaped"] for s in states]).to(rg.dtype)
        if options["escaped_mass"]:
            # what the projection dropped from V̄; never more than the trace it lost (a rounding guard)
            drop = (torch.linalg.eigvalsh(v_prev) - torch.linalg.eigvalsh(v_turned)).amax(-1).clamp(min=0)
            trace_drop = (v_prev.diagonal(dim1=-2, dim2=-1) - v_turned.diagonal(dim1=-2, dim2=-1)).sum(-1)
            escaped = b2.view(-1) * (escaped + torch.minimum(drop, trace_drop.clamp(min=0)))
        lam, vec = torch.linalg.eigh(v)
        # V̄ is PSD: a rounding-negative eigenvalue is 0, not a NaN
        inv_root = (lam.clamp(min=0) + escaped[:, None]).sqrt().add(options["eps"]).reciprocal()
        precond = (vec * inv_root[:, None, :]) @ vec.mT
        for slab, q, g in zip(rg.slabs, bases, grads):
            rows = slice(slab.start, slab.stop)
            m_prev = self._tall_stack(slab, torch.stack([s["exp_avg"] for s in states[rows]])).to(rg.dtype)
            m = b1[rows] * (m_prev @ p[rows].mT) + (1 - b1[rows]) * (g @ precond[rows])
            direction = m
            if options["update_cap"] is not None:
                rms = m.square().mean(dim=(1, 2), keepdim=True).sqrt()
                direction = m / (rms / options["update_cap"]).clamp(min=1)
            delta = direction @ r_partner[rows].mT
            self._apply(slab, delta)
            factors = slab.factors
            torch._foreach_copy_([s["exp_avg"] for s in states[rows]], [f.tall(t) for f, t in zip(factors, m)])
            torch._foreach_copy_([s["basis"] for s in states[rows]], [f.tall(t) for f, t in zip(factors, q)])
        torch._foreach_copy_([s["exp_avg_sq"] for s in states], list(v))
        torch._foreach_copy_([s["escaped"] for s in states], list(escaped))
        torch._foreach_add_([s["step"] for s in states], 1.0)

    @staticmethod
    def _tall_stack(slab: _Slab, stacked: torch.Tensor) -> torch.Tensor:
        """A stack of states in the factors' own layouts, turned tall (a slab may mix A's and B's of one n)."""
        if all(f.is_a for f in slab.factors):
            return stacked.mT
        if not any(f.is_a for f in slab.factors):
            return stacked
        raise AssertionError("unreachable: a mixed slab is stacked factor by factor")

    @staticmethod
    def _apply(slab: _Slab, delta: torch.Tensor) -> None:
        """F ← F·(1 − lr·wd) − lr·Δ per factor, with each pair's own lr and weight decay (its param group)."""
        params = [f.param for f in slab.factors]
        decays = [1 - f.group["lr"] * f.group["weight_decay"] for f in slab.factors]
        if any(d != 1 for d in decays):
            torch._foreach_mul_(params, decays)
        steps = [f.tall(t) for f, t in zip(slab.factors, delta)]
        torch._foreach_mul_(steps, [-f.group["lr"] for f in slab.factors])
        torch._foreach_add_(params, steps)
