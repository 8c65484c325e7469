"""LoRA-RITE: Yen et al., "LoRA Done RITE: Robust Invariant Transformation Equilibration for LoRA Optimization",
arXiv:2410.20625 (ICLR 2025). An adaptive matrix preconditioner whose update of ΔW = B·A does not depend on how ΔW
is factored: (S⁻¹A, B·S) for any invertible r×r S gives the same ΔW at every step (Adam's does not).

Notation (the paper's, in "tall" layout, rank axis last): F_A = Aᵀ (in×r), F_B = B (out×r), so ΔW = F_B·F_Aᵀ and
the gradient of each factor is ∇_A = Gᵀ·F_B, ∇_B = G·F_A for G = ∂L/∂ΔW (times the layer's scale s). For a factor
X with partner Y (A↔B), every step, all with the partner's magnitude removed (paper, Algorithm 1):

    F_X = U_X R_X                                   thin QR (A: QR of Aᵀ); R⁺ a pseudo-inverse, since B = 0 at init
    ḡ_X = ∇_X · R_Y⁺                                unmagnified gradient = Gᵀ U_B (for A): invariant up to a rotation
    ḡ_X ← 0 if RMS(ḡ_X) > skip_rms                  update skipping, per factor (also when not finite)
    ḡ ← ḡ · min(1, clip_norm / ‖ḡ‖)                 one global norm over every factor of the model
    P_X = U_Yᵀ U_Y,prev                             the partner's basis change since the last step
    V̄_X = β̂₂ · P_X V̄_X Pᵀ_X + (1 − β̂₂) · ḡᵀḡ / n     second moment, r×r, carried into the new basis
    ρ_X = β̂₂ · (ρ_X + d_λ(V̄_prev, P V̄_prev Pᵀ))     escaped mass (option): d_λ = max_i λ_i(V̄) − λ_i(PV̄Pᵀ) ≥ 0
    S̄_X = ḡ_X · E diag(1 / (√(λ + ρ) + eps)) Eᵀ      (V̄_X + ρI)^(−1/2) by eigh, eps = 1e-6 as the authors
    M̄_X = β̂₁ · M̄_X Pᵀ_X + (1 − β̂₁) · S̄_X            first moment of the preconditioned step, also carried by P
    M̄_X ← M̄_X / max(1, RMS(M̄_X) / update_cap)       update capping (option; the state keeps the uncapped M̄)
    F_X ← F_X − lr · (M̄_X R_Y⁺ᵀ + wd · F_X)          the partner's magnitude restored

β̂ is Adafactor's bias-corrected decay β(1 − β^(t−1)) / (1 − β^t) (Shazeer & Stern 2018, §7.1), so the first step
uses the gradient alone and no separate bias correction is needed. Why it is invariant: with (S⁻¹A, B·S) the bases
become U·O for an orthogonal O, ḡ → ḡO, V̄ → OᵀV̄O, S̄ → S̄O, M̄ → M̄O, and M̄R⁺ᵀ moves the factors by exactly the S
that relates them, so the two runs keep ΔW equal. The global norm, the RMS tests and the eigenvalues are rotation
invariant. Decoupled weight decay multiplies A and B by the same scalar 1 − lr·wd, which commutes with S, so it keeps
the invariance too (the tests check it); what it does is decay ΔW by (1 − lr·wd)² per step, about twice the rate
the same weight_decay gives a full weight, and the paper's and authors' recipes use none: hence a warning. (An L2
gradient wd·F fed through the preconditioner would break the invariance; it is not offered.)

Pairs: every adapter layer's trained (A, B) — LoRA, OLoRA (ΔW = BA − B0A0 with B0A0 frozen) — and LoRA-Mini's
(A_in, B_in): ΔW = B_out (B_in A_in) A_out, and the inner product Z = B_in·A_in is itself a rank-r LoRA in the
(a, b) coordinates, so the same invariance holds for (S⁻¹A_in, B_in·S). Layers training anything else (MoRA's M,
LoRA-XS's R, LoRTA's shared tensors, PRoLoRA's four tensors, MELoRA's batched blocks) and trainable parameters
outside the pairs are refused with a ConfigError: the optimizer is RITE only, never a silent mix with Adam. So are
FSDP-sharded factors (a QR needs the whole factor): create LoraRite on the unwrapped model and train with DDP.

State (all in `self.state`, per factor, plain tensors, so state_dict / load_state_dict resume exactly): `step` (0-d
float32 on the parameter's device), `exp_avg` (M̄, the factor's shape), `exp_avg_sq` (V̄, r×r), `basis` (U of the
last step, the factor's shape) and `escaped` (ρ, 0-d); float32 for half-precision factors. One param group per
pair, [A, B], with the layer's name. lr and weight_decay are read per group (schedulers work as usual); the other
options are optimizer-wide (the first group's).

Batching: the factors of one tall shape (n, r), A's and B's alike, are stacked for one batched QR and one bmm per
product, and the r×r algebra (pinv, eigh) runs once over every factor of the same rank. No Python branch reads a
tensor value: skipping and clipping are `torch.where` / `clamp` arithmetic (on CUDA the pinv and eigh kernels still
check their own status, which waits for the device once each).

Checked against the authors' PyTorch port (github.com/gkevinyen5418/LoRA-RITE, lora_rite.py, `LoRARite.step` and
`_LoraRiteHelper`): same QR / pinv, unmagnified gradient, per-factor skip before the global clip, ḡᵀḡ/n, basis
carry P = U_newᵀU_old of the partner for both moments, bias-corrected decays, 1/(√(λ+ρ) + eps), escaped mass
β̂₂(ρ + min(eigenvalue drop, trace drop)), capping of M̄ only for the step, and the decoupled weight decay. The
differences: the state lives in `self.state` (theirs in a namespace object that state_dict cannot save); pairs
come from the adapter layers, not from the order of a parameter list; a non-finite unmagnified gradient counts as
skipped (their `>` test lets NaN through); eigenvalues are clamped at 0 before the square root (theirs can take
the √ of a rounding-negative value and then zero the NaN); their unused options (relative epsilon, which fails as
written, and balance_param) are left out; half-precision factors are computed in float32.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from ..errors import ConfigError
from ..inject import adapter_layers

PAIR_NAMES = (("A", "B"), ("A_in", "B_in"))  # (r × n_a, n_b × r) trained factor pairs of the known methods
HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the optimizer's algebra and state: float32 for half-precision factors."""
    return torch.float32 if dtype in HALF else dtype


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def _unsupported(method: str, detail: str) -> ConfigError:
    return ConfigError(
        f"LoraRite needs one (A, B) factor pair per adapter layer, but method {method!r} {detail}; "
        f"use torch.optim.AdamW for {method}"
    )


def factor_pairs(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(layer name, A, B) of every adapter layer; ConfigError for anything LoraRite cannot optimize."""
    pairs = []
    for name, layer in adapter_layers(model):
        params = layer.trainable_parameters()
        names = next((pair for pair in PAIR_NAMES if set(pair) == set(params)), None)
        if names is None:
            trained = ", ".join(sorted(params)) or "only tensors shared by all layers"
            raise _unsupported(layer.method, f"trains {trained} in {name}")
        a, b = params[names[0]], params[names[1]]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise _unsupported(
                layer.method,
                f"has factors {names[0]} {tuple(a.shape)} and {names[1]} {tuple(b.shape)} in {name}, "
                f"not an r×n and an n×r matrix",
            )
        if _is_dtensor(a) or _is_dtensor(b):
            raise ConfigError(
                f"LoraRite needs whole factors, but {name}'s are sharded (FSDP); create it before sharding and "
                f"train with DDP, or use torch.optim.AdamW"
            )
        r, width = a.shape[0], min(a.shape[1], b.shape[0])
        if r > width:
            raise ConfigError(
                f"LoraRite: {name} has rank r={r} above its width {width} (factors {tuple(a.shape)}, "
                f"{tuple(b.shape)}); use r <= {width} or torch.optim.AdamW"
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


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class _Factor:
    param: nn.Parameter
    is_a: bool  # A is stored r × n: its tall form is the transpose
    group: dict

    def tall(self, t: torch.Tensor) -> torch.Tensor:
        """t (in the factor's own layout) as n × r, or back: the transpose is its own inverse."""
        return t.mT if self.is_a else t

    @property
    def grad(self) -> torch.Tensor:
        return self.param.grad if self.param.grad is not None else torch.zeros_like(self.param)


@dataclass
class _Slab:
    """Factors of one tall shape (n × r), A's and B's alike: one batched QR; rows start:stop of their rank group."""

    factors: list[_Factor]
    start: int
    stop: int

    def stack(self, tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The slab's tensors (each in its factor's layout) stacked tall: (factors, n, r)."""
        return torch.stack([f.tall(t) for f, t in zip(self.factors, tensors)]).to(dtype)

    def unstack(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        """Views of a tall stack in each factor's own layout."""
        return [f.tall(t) for f, t in zip(self.factors, stacked)]


@dataclass
class _RankGroup:
    """Every factor of one rank, dtype and device: the r×r algebra runs once for all of them."""

    factors: list[_Factor]  # in slab order
    slabs: list[_Slab]
    partner: torch.Tensor  # row of each factor's partner (A ↔ B), on the device
    dtype: torch.dtype  # compute dtype: float32 for half-precision factors


class LoraRite(torch.optim.Optimizer):
    """LoRA-RITE over every adapter pair of `model` (see the module docstring for the algorithm).

    model: the adapted model (lorakit.adapt), before DDP wrapping; LoraRite pairs each layer's (A, B) itself.
    lr: on the scale of Adam's for LoRA (the authors' finetune.py passes RITE the same --learning_rate as AdamW).
    betas: decays of the first and second moment. eps: added to √λ of the second moment (the authors' 1e-6).
    clip_norm: global norm of the unmagnified gradients (None: off). skip_rms: zero a factor's unmagnified gradient
    whose RMS exceeds it, or that is not finite (None: off). update_cap: cap the RMS of each factor's step before
    its magnitude is restored (None: off). escaped_mass: the paper's ρ term. weight_decay: decoupled, on both
    factors, so ΔW decays by (1 − lr·wd)² per step (warned; the recipes use 0). batched=False runs every factor on
    its own (a reference path for tests).
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
        if not isinstance(model, nn.Module):
            raise ConfigError(
                "LoraRite takes the adapted model (it pairs every adapter layer's A and B itself), not a list of "
                "parameters: LoraRite(model, lr=...)"
            )
        pair = tuple(betas) if isinstance(betas, tuple | list) else ()
        checks = [
            ("lr", lr, _number(lr) and lr >= 0),
            ("betas", betas, len(pair) == 2 and all(_number(b) and 0 <= b < 1 for b in pair)),
            ("eps", eps, _number(eps) and eps >= 0),
            ("weight_decay", weight_decay, _number(weight_decay) and weight_decay >= 0),
            ("escaped_mass", escaped_mass, isinstance(escaped_mass, bool)),
        ]
        for key, value in (("clip_norm", clip_norm), ("skip_rms", skip_rms), ("update_cap", update_cap)):
            checks.append((key, value, value is None or (_number(value) and value > 0)))
        for key, value, ok in checks:
            if not ok:
                raise ConfigError(f"LoraRite: {key}={value!r} is invalid; see help(lorakit.optim.LoraRite)")
        groups = [{"params": [a, b], "name": name} for name, a, b in factor_pairs(model)]
        if weight_decay > 0:
            warnings.warn(
                f"LoraRite: weight_decay={weight_decay} shrinks both factors A and B by (1 - lr*weight_decay) every "
                f"step, so ΔW = B·A decays by its square, about twice what the same AdamW weight_decay does to a full "
                f"weight; LoRA-RITE's recipes (paper, authors' code) use weight_decay=0",
                UserWarning,
                stacklevel=2,
            )
        defaults = dict(
            lr=lr,
            betas=pair,
            eps=eps,
            weight_decay=weight_decay,
            clip_norm=clip_norm,
            skip_rms=skip_rms,
            update_cap=update_cap,
            escaped_mass=escaped_mass,
        )
        self._plan_key = None
        self._plan: list[_RankGroup] = []
        super().__init__(groups, defaults)
        self.batched = batched

    # ----------------------------------------------------------------- groups, state and layout
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if not (
            len(params) == 2 and params[0].dim() == params[1].dim() == 2 and params[0].shape[0] == params[1].shape[1]
        ):
            self.param_groups.pop()
            raise ConfigError("LoraRite: a param group is one adapter pair [A (r × n_a), B (n_b × r)]")
        self._plan_key = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts saved state to the parameter's dtype and leaves `step` where it was saved (CPU); RITE keeps
        # its state in the compute dtype (float32 for half-precision factors) and `step` on the parameter's device
        saved = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(saved, chain.from_iterable(g["params"] for g in self.param_groups)))
        for index, values in state_dict["state"].items():
            p = params[index]
            dtype = _compute_dtype(p.dtype)
            self.state[p] = {
                key: torch.as_tensor(value).to(
                    device=p.device, dtype=torch.float32 if key == "step" else dtype, copy=True
                )
                for key, value in values.items()
            }
        self._plan_key = None  # the param group dicts were replaced

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
            (id(g), id(a), id(b), a.device, a.dtype, a.shape, b.shape) for g in live for a, b in [g["params"]]
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
            plan.append(_RankGroup([factors[i] for i in order], slabs, partner, _compute_dtype(dtype)))
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
            dtype = torch.float64 if any(rg.dtype == torch.float64 for rg in plan) else torch.float32
            norm = torch.stack([sq.to(device=device, dtype=dtype) for *_, sq in first]).sum().sqrt()
            scale = options["clip_norm"] / norm.clamp(min=options["clip_norm"])  # 1 when under the limit
        for rg, (bases, grads, r_partner, _) in zip(plan, first):
            self._update(rg, bases, grads, r_partner, scale, options)
        return loss

    def _unmagnified(self, rg: _RankGroup, skip_rms: float | None):
        """QR bases and unmagnified gradients ḡ = ∇·R⁺_partner of a rank group, and their squared norm."""
        bases, rs, grads = [], [], []
        for slab in rg.slabs:
            q, r = torch.linalg.qr(slab.stack([f.param for f in slab.factors], rg.dtype))
            bases.append(q)
            rs.append(r)
            grads.append(slab.stack([f.grad for f in slab.factors], rg.dtype))
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
        steps = steps.to(rg.dtype)  # the decays in the factors' precision (float64: not rounded to float32)
        b1 = _decay(steps, beta1)[:, None, None]
        b2 = _decay(steps, beta2)[:, None, None]
        turns, moments = [], []  # per slab: U_newᵀ U_prev of each factor, and ḡᵀḡ / n
        for slab, q, g in zip(rg.slabs, bases, grads):
            if scale is not None:
                g.mul_(scale.to(g.dtype))
            prev = slab.stack([s["basis"] for s in states[slab.start : slab.stop]], rg.dtype)
            turns.append(q.mT @ prev)
            moments.append(g.mT @ g / g.shape[1])
        p = torch.cat(turns)[rg.partner]  # a factor's moments live in its partner's basis
        v_prev = torch.stack([s["exp_avg_sq"] for s in states])
        v_turned = _sym(p @ v_prev @ p.mT)
        v = _sym(b2 * v_turned + (1 - b2) * torch.cat(moments))
        escaped = torch.stack([s["escaped"] for s in states])
        if options["escaped_mass"]:
            # d_λ: the largest eigenvalue drop of the projection, capped by the trace drop as the authors' code does
            # (the same in exact arithmetic: P is a contraction, so every eigenvalue drops, and they sum to the trace)
            drop = (torch.linalg.eigvalsh(v_prev) - torch.linalg.eigvalsh(v_turned)).amax(-1)
            trace_drop = (v_prev.diagonal(dim1=-2, dim2=-1) - v_turned.diagonal(dim1=-2, dim2=-1)).sum(-1)
            escaped = b2.view(-1) * (escaped + torch.minimum(drop, trace_drop).clamp(min=0))
        lam, vec = torch.linalg.eigh(v)
        # V̄ is PSD: a rounding-negative eigenvalue is 0, not a NaN
        inv_root = (lam.clamp(min=0) + escaped[:, None]).sqrt().add(options["eps"]).reciprocal()
        precond = (vec * inv_root[:, None, :]) @ vec.mT
        for slab, q, g in zip(rg.slabs, bases, grads):
            rows = slice(slab.start, slab.stop)
            m_prev = slab.stack([s["exp_avg"] for s in states[rows]], rg.dtype)
            m = b1[rows] * (m_prev @ p[rows].mT) + (1 - b1[rows]) * (g @ precond[rows])
            direction = m
            if options["update_cap"] is not None:
                rms = m.square().mean(dim=(1, 2), keepdim=True).sqrt()
                direction = m / (rms / options["update_cap"]).clamp(min=1)
            self._apply(slab, direction @ r_partner[rows].mT)
            torch._foreach_copy_([s["exp_avg"] for s in states[rows]], slab.unstack(m))
            torch._foreach_copy_([s["basis"] for s in states[rows]], slab.unstack(q))
        torch._foreach_copy_([s["exp_avg_sq"] for s in states], list(v))
        torch._foreach_copy_([s["escaped"] for s in states], list(escaped))
        torch._foreach_add_([s["step"] for s in states], 1.0)

    @staticmethod
    def _apply(slab: _Slab, delta: torch.Tensor) -> None:
        """F ← F·(1 − lr·wd) − lr·Δ per factor, with each pair's own lr and weight decay (its param group)."""
        params = [f.param for f in slab.factors]
        decays = [1 - f.group["lr"] * f.group["weight_decay"] for f in slab.factors]
        if any(d != 1 for d in decays):
            torch._foreach_mul_(params, decays)
        steps = slab.unstack(delta)
        torch._foreach_mul_(steps, [-f.group["lr"] for f in slab.factors])
        if steps[0].dtype != params[0].dtype:
            steps = [s.to(p.dtype) for s, p in zip(steps, params)]
        torch._foreach_add_(params, steps)
