"""IncreLoRA: Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
Fine-tuning", arXiv:2308.12043. Authors' code: github.com/FeiyuZhang98/IncreLoRA, `loralib/loralib/increlora.py`
(`SVDLinear`, `RankAllocator`) and the trainer in `NLU/src/transformers/trainer.py` / `optimization.py`.

Every module starts at rank 1 and the most important modules gain ranks during training, until the total rank
reaches a budget of `target_rank` × modules. Per module (components j = rank-one terms):

    ΔW = (alpha / ranknum) · B · diag(E) · A                   (SVDLinear.forward: B @ (A * E) * scaling / ranknum)

ranknum is the number of active components, so every growth rescales the existing ones by alpha / ranknum (the
authors divide by ranknum + 1e-5, a guard lorakit does not need: ranknum ≥ 1).

- Start (`update_and_increase` at step 0, `add_reserve_param`): one active component, A, B ~ N(0, 0.02²), E = 0;
  plus `increment` reserve components ("advance learning", option `advance`, on by default): their A and B train
  from the first step, their E is fixed at 1e-5 and they take part in the forward pass (scaled like the others).
  With advance=false the reserves have E = 0 and do not train until they are activated. Two differences from
  the authors' trainer, as reported by a review of their code (issue 28): its reserves first train at step 1, and
  it clips the gradient norm at 1.0 (max_grad_norm); lorakit trains the reserves from step 0 and does not clip
  (inside transformers' Trainer, its max_grad_norm clips the layers' gradients before `after_backward`).
- Importance (`SVDLinear.backward_hook`): one number per module, s = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW), where ΔW is the
  full scaled update matrix the forward uses (reserves included) and ∂L/∂ΔW is the gradient with respect to that
  matrix, i.e. the module's `grad_output` in the authors' hook, NOT a combination of parameter gradients. lorakit
  gets it from the adapter layer's input h (the dropout output when dropout > 0) and output gradient δy:
  ∂L/∂ΔW = Σ_tokens δyᵀ h, summed over the step's micro-batches (the authors overwrite it per backward, i.e. keep
  the last micro-batch; their scripts use no accumulation, where the two agree).
- Smoothing (`RankAllocator.update_ipt`), every step while the budget is not reached:
  Ī ← β₁Ī + (1−β₁)s, Ū ← β₂Ū + (1−β₂)|s − Ī| (with the new Ī), score Ī·Ū, β₁ = β₂ = 0.85.
- Growth (`increase_to_target_rank`): at steps t > `warmup` with t % `interval` == 0 (t = optimizer steps done,
  the authors' `global_step`), the `top_h` modules with the highest scores each gain `increment` ranks (default
  {2: 1, 4: 2, 6: 3, 8: 4}[target_rank], i.e. target_rank // 2): their oldest reserves become active (E starts
  training from its reserve value) and as many new reserves are added. Where lorakit differs, on purpose: the
  authors take every module scoring ≥ the k-th score with k = min(top_h, budget − total) and give each the full
  increment, so ties and a large increment overshoot the budget; lorakit takes at most top_h modules in score
  order (ties: module order) and caps the last growth exactly, so the total never exceeds the budget. A module
  whose capacity is full is passed over.
- When the budget is reached the reserves are switched off (E = 0, as the authors) and scoring stops (the authors
  remove the hook). At the end of the last step the reserves are switched off as well, so the final eval of the
  live model is the eval of the adapter as saved.
- Orthogonality regulariser (`Trainer.compute_svd_orth_regu`, the one the authors' trainer adds to the loss):
  coef · mean over matrices of ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F (not squared), A and B of every module with all its
  components including the reserves, `orth` = 0.1 by default (`compute_orth_regu`'s default; the authors' GLUE
  scripts pass 0.3). Added as its exact gradient, coef/(2M) · 2(AAᵀ − I)A/‖AAᵀ − I‖_F (and likewise for B), in
  `after_backward`; the logged loss is the task loss only.

Optimizer. The authors put the new parameters of each growth (E of the activated components, A and B of the new
reserves) into their own AdamW parameter group with a restarted schedule (`Multi_LambdaLR`). lorakit does exactly
that with a torch.optim.AdamW of its own (betas, eps, weight decay and the scheduled rate of the run's AdamW):
group "since s" holds the parameters that joined at step s (−1: from the start, the initial component and the
first reserves, which follow the run's schedule); a group that joined at step s trains from step s + 1 with the
run's rate × min(1, j / `rewarm_steps`), j = steps since it started (0 at the first: HF's warm-up convention, the
authors' too). After the warm-up it follows the run's schedule (the authors restart the whole linear decay over
the remaining steps). Adam's moments and step count are per group, so bias correction restarts with each group
exactly as for new parameters. The run's own optimizer steps nothing (the adapter's gradients are handed to this
one and cleared).

Ranks on the command line: `lorakit train --rank 8 --procedure increlora` grows to a budget of average rank 8
(`target_rank` overrides --rank). The layers are allocated at a per-module CAPACITY R (active + reserve components,
option `capacity`, default 2·target_rank + increment, ours: the authors' modules grow without a per-module cap, so
here a module can reach about twice the average rank). A model adapted outside `lorakit train` (the Trainer
callback) has R = its adapter's r, and must then give target_rank; R must be ≥ target_rank + increment.

How it fits lorakit with fixed shapes (DDP registers parameters once; checkpoints and optimizer state expect fixed
tensors). The run adapts with plain LoRA at rank R per module. The true factors A (R×in, the layer's own A), B (R×out, kept
here transposed) and E (R) are fixed-size tensors; components are allocated in order (active, then reserves, then
unused), so each optimizer group is a set of row ranges, which the optimizer sees as Parameters aliasing those
rows (and Adam's moments alias fixed-size moment tensors). The layer's B holds the EFFECTIVE factor
B·diag(c·E)/s (c = alpha/ranknum, s the layer's scale), so the layer's ordinary forward computes ΔW exactly and
unused components contribute nothing. The gradients of the true factors follow exactly from the layer's:
∂L/∂A = ∂L/∂A_layer, ∂L/∂B_j = (c·E_j/s)·∂L/∂B_layer,j, ∂L/∂E_j = (c/s)·⟨B_j, ∂L/∂B_layer,j⟩; components outside
the groups get no movement at all.

DDP: the layer gradients are averaged by DDP, so every process takes the same optimizer step. ∂L/∂ΔW is not a
parameter gradient and is NOT averaged: each process computes its score from its own batch; the per-module scores
are averaged over processes (all_reduce, then a broadcast from process 0 so all hold the same bits) before
smoothing, so every process makes the same growth decision and the adapters stay identical. The mean of the
per-process scores is not the score of the global batch (Σ|ΔW ⊙ mean G_p| ≤ mean Σ|ΔW ⊙ G_p|), so a 2-process run
can grow other modules than a 1-process run with the double batch. `sync=gradients` averages ∂L/∂ΔW itself
instead (one all_reduce of out × in floats per module and step while growing) and then matches one process.

Output. The reserves are dropped; the final adapter is one plain LoRA per module with its active rank r_i
(A = A_active, B = c·B_active·diag(E_active), alpha = r_i so the scale is 1), each module at its own rank r_i (the
file's per-module ranks; `lorakit inspect` lists them, PEFT export writes them as rank_pattern). The r_i sum to
≤ the budget (`ranks()`, `report()`). During training the reserves and the pre-allocated capacity are extra:
`report()` gives the trained parameter count (active + reserve components) next to the saved one.

Not supported: methods other than lora, --rslora (IncreLoRA scales by alpha/ranknum), --optimizer rite,
--precision fp16 (its gradients are read before unscaling), --fsdp.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
from torch import nn

from .. import random as lk_random
from ..errors import ConfigError
from ..inject import adapter_layers
from ..methods.lora import LoraLayer
from ..options import Option
from . import register_procedure
from .base import Procedure, TrainingState, plain_lora

RESERVE_E = 1e-5  # add_reserve_param: e[0][0] = 1e-5 if advance_learn else 0.
INIT_STD = 0.02  # SVDLinear.reset_parameters: A, B ~ N(0, 0.02²), E = 0
FROM_START = -1  # `since` of the parameters that train from the first step
UNTRAINED = -2  # `since` of a component part (A/B or E) that does not train (yet)
KINDS = ("A", "Bt", "E")


def default_increment(target_rank: int) -> int:
    """The authors' {2: 1, 4: 2, 6: 3, 8: 4}[target_rank], extended to every target."""
    return max(1, target_rank // 2)


def importance(delta: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """s = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW) (SVDLinear.backward_hook)."""
    if grad is None:
        return torch.zeros((), dtype=torch.float64, device=delta.device)
    return (delta * grad).abs().sum().double() / math.sqrt(delta.numel())


def smooth(ipt: float, unc: float, score: float, beta1: float, beta2: float) -> tuple[float, float]:
    """One step of RankAllocator.update_ipt: (Ī, Ū) after seeing score s."""
    ipt = beta1 * ipt + (1 - beta1) * score
    unc = beta2 * unc + (1 - beta2) * abs(score - ipt)
    return ipt, unc


def orthogonality(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖XXᵀ − I‖_F, its gradient) for X whose rows are components (A, or Bᵀ: ‖BᵀB − I‖ = ‖(Bᵀ)(Bᵀ)ᵀ − I‖)."""
    gram = rows @ rows.T
    gram.diagonal().sub_(1.0)
    norm = torch.linalg.matrix_norm(gram)
    if norm == 0:
        return norm, torch.zeros_like(rows)
    return norm, (2.0 / norm) * (gram @ rows)


def allocate(scores: list[float], room: list[int], top_h: int, increment: int, remaining: int) -> dict[int, int]:
    """{module index: ranks gained}: at most top_h modules in score order (ties: lower index first), each
    min(increment, its room), stopping exactly at the remaining budget."""
    picked: dict[int, int] = {}
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if len(picked) == top_h or remaining <= 0:
            break
        gain = min(increment, room[i], remaining)
        if gain > 0:
            picked[i] = gain
            remaining -= gain
    return picked


def _runs(since: list[int], value: int) -> list[tuple[int, int]]:
    """Contiguous ranges [a, b) where since[j] == value."""
    runs, start = [], None
    for j, s in enumerate([*since, None]):
        if s == value and start is None:
            start = j
        elif s != value and start is not None:
            runs.append((start, j))
            start = None
    return runs


class _Module:
    """IncreLoRA's state for one adapted module: true factors, moments, gradients and component bookkeeping."""

    def __init__(self, name: str, layer: LoraLayer):
        self.name, self.layer = name, layer
        capacity, device, dtype = layer.r, layer.A.device, layer.A.dtype
        zeros = partial(torch.zeros, device=device, dtype=dtype)
        shapes = {"A": (capacity, layer.in_features), "Bt": (capacity, layer.out_features), "E": (capacity,)}
        # A is the layer's own parameter (its rows are the true A); B (transposed) and E live here
        self.data = {"A": layer.A.data, "Bt": zeros(shapes["Bt"]), "E": zeros(shapes["E"])}
        self.exp_avg = {k: zeros(shape) for k, shape in shapes.items()}
        self.exp_avg_sq = {k: zeros(shape) for k, shape in shapes.items()}
        self.grad = {k: zeros(shape) for k, shape in shapes.items()}
        self.capacity = capacity
        self.active = 0  # ranknum
        self.used = 0  # active + reserves
        self.ab_since = [UNTRAINED] * capacity  # when each component's A and B joined the optimizer
        self.e_since = [UNTRAINED] * capacity  # when each component's E did
        self.ipt = 0.0  # Ī
        self.unc = 0.0  # Ū
        self.delta_grad: torch.Tensor | None = None  # ∂L/∂ΔW of this step (while scoring)
        self.dropped: torch.Tensor | None = None  # the dropout output of the current forward

    @property
    def scale_ratio(self) -> float:
        """c / s: (alpha / ranknum) over the layer's own scale."""
        return self.layer.config.alpha / max(self.active, 1) / self.layer.scale

    def effective(self) -> torch.Tensor:
        """The per-component factor c·E/s that the layer's B carries."""
        return self.data["E"] * self.scale_ratio

    def write_layer(self) -> None:
        """The layer's B ← B·diag(c·E/s), so its forward s·B_layer·A is ΔW (A is shared, nothing to write)."""
        with torch.no_grad():
            self.layer.B.copy_((self.data["Bt"] * self.effective()[:, None]).T)

    def init_fresh(self, advance: bool, increment: int) -> None:
        gen = lk_random.generator(self.layer.config.seed, self.name, "increlora")
        with torch.no_grad():
            for key in ("A", "Bt"):
                drawn = torch.randn(self.data[key].shape, generator=gen, dtype=torch.float32) * INIT_STD
                self.data[key].copy_(drawn)
            self.data["E"].zero_()
            self.active, self.used = 1, 1 + increment
            self.ab_since[0] = self.e_since[0] = FROM_START
            for j in range(1, self.used):
                self.data["E"][j] = RESERVE_E if advance else 0.0
                self.ab_since[j] = FROM_START if advance else UNTRAINED

    def trained_parameters(self) -> int:
        per_component = self.layer.in_features + self.layer.out_features
        return sum(per_component for s in self.ab_since if s != UNTRAINED) + sum(
            1 for s in self.e_since if s != UNTRAINED
        )


@register_procedure
class IncreLora(Procedure):
    name = "increlora"
    options = {
        "target_rank": Option(
            0, int, "average rank of the budget, total rank = target_rank x modules (0: --rank)", minimum=0
        ),
        "capacity": Option(
            0, int, "components allocated per module, active + reserve (0: 2 x target_rank + increment)", minimum=0
        ),
        "increment": Option(
            0, int, "ranks a selected module gains (0: target_rank // 2, the authors' table)", minimum=0
        ),
        "top_h": Option(10, int, "modules selected per growth", minimum=1),
        "warmup": Option(10, int, "steps before the first growth (growth at steps t > warmup)", minimum=0),
        "interval": Option(10, int, "steps between growths", minimum=1),
        "rewarm_steps": Option(10, int, "linear warm-up of each new parameter group (0: none)", minimum=0),
        "beta1": Option(0.85, float, "EMA of the importance", minimum=0.0, maximum=0.999999),
        "beta2": Option(0.85, float, "EMA of the uncertainty", minimum=0.0, maximum=0.999999),
        "orth": Option(0.1, float, "orthogonality regulariser coefficient", minimum=0.0),
        "advance": Option(True, bool, "reserves train ahead of their activation (advance learning)"),
        "sync": Option("scores", str, "DDP: average the scores, or the gradients ∂L/∂ΔW", ("scores", "gradients")),
    }

    def __init__(self, options: dict):
        super().__init__(options)
        self.modules: list[_Module] = []
        self.optimizer: torch.optim.AdamW | None = None
        self.events: list[list] = []  # [step, {module: ranks gained}] per growth
        self.done = False  # the budget is reached
        self.finished = False  # the last step ran: reserves dropped
        self.hooks: list = []
        self.restored: tuple[dict, dict] | None = None
        self.reduce_scores = True  # only tests turn this off (to show that unsynchronised processes diverge)
        self.last_local_scores: list[float] = []

    # ----------------------------------------------------------------- settings
    @property
    def target_rank(self) -> int:
        if not self.settings["target_rank"]:
            raise ConfigError(
                "--procedure increlora: give target_rank=N (the budget's average rank) when the model was adapted "
                "outside `lorakit train`; its adapter's r is the capacity per module"
            )
        return self.settings["target_rank"]

    @property
    def increment(self) -> int:
        return self.settings["increment"] or default_increment(self.target_rank)

    @property
    def capacity(self) -> int:
        return self.settings["capacity"] or 2 * self.target_rank + self.increment

    def adapter_config(self, config):
        """--rank is the budget's average rank (unless target_rank is given); the layers get the capacity."""
        if not self.settings["target_rank"]:
            self.settings["target_rank"] = config.r
        self.settings["capacity"] = self.capacity
        return dataclasses.replace(config, r=self.capacity)

    @property
    def budget(self) -> int:
        return self.target_rank * len(self.modules)

    @property
    def total(self) -> int:
        return sum(m.active for m in self.modules)

    def check_model(self, model) -> None:
        layers = list(adapter_layers(model))
        for name, layer in layers:
            if layer.method != "lora":
                raise ConfigError(
                    f"--procedure increlora grows a LoRA, but {name} is {layer.method}; use --method lora"
                )
        config = layers[0][1].config
        if config.rslora:
            raise ConfigError("--procedure increlora scales by alpha/ranknum; train it without --rslora")
        need = self.target_rank + self.increment
        if config.r < need:
            raise ConfigError(
                f"--procedure increlora: the capacity per module (active + reserve ranks) is {config.r} and must be "
                f">= target_rank + increment = {need}; use capacity={need} or more (a model adapted by you: r >= {need})"
            )

    # ----------------------------------------------------------------- the run
    def on_train_begin(self, state: TrainingState) -> None:
        inner = getattr(state.optimizer, "optimizer", state.optimizer)
        if not isinstance(inner, torch.optim.AdamW):
            raise ConfigError(
                "--procedure increlora trains with AdamW (a parameter group per growth); use --optimizer adamw"
            )
        if getattr(state.optimizer, "scaler", None) is not None:
            raise ConfigError(
                "--procedure increlora reads gradients before fp16 loss scaling is undone; use --precision bf16 or no"
            )
        self.check_model(state.model)
        # built here, after the runtime placed the model: the optimizer's Parameters alias the layers' storage
        self.modules = [_Module(name, layer) for name, layer in adapter_layers(state.model)]
        if self.restored is not None:
            self._restore(*self.restored)
            self.restored = None
        else:
            for module in self.modules:
                module.init_fresh(self.settings["advance"], self.increment)
            self.done = self.total >= self.budget
            if self.done:
                self._switch_off_reserves()
        hyper = inner.param_groups[0]
        self.optimizer = None
        self.defaults = dict(betas=hyper["betas"], eps=hyper["eps"], weight_decay=hyper["weight_decay"])
        for since in sorted({s for m in self.modules for s in (*m.ab_since, *m.e_since)} - {UNTRAINED}):
            self._add_group(since, state.step)
        for module in self.modules:
            module.write_layer()

    def before_step(self, state: TrainingState) -> None:
        if not self.done:
            self._attach_hooks()

    def after_backward(self, state: TrainingState) -> None:
        self._detach_hooks()
        scoring = not self.done
        if scoring:  # on ΔW of this step's forward, before any update
            self._update_scores(state)
        self._collect_gradients()
        lr = state.optimizer.param_groups[0]["lr"]
        for group in self.optimizer.param_groups:
            group["lr"] = lr * self._warmup_factor(group["since"], state.step)
        self.optimizer.step()
        step = state.step
        if scoring and step > self.settings["warmup"] and step % self.settings["interval"] == 0:
            self._grow(step)
        for module in self.modules:
            module.write_layer()

    def after_optimizer_step(self, state: TrainingState) -> None:
        if state.step + 1 == state.total_steps and not self.finished:
            self.finished = True
            self._switch_off_reserves()  # the final eval sees the adapter as saved
            for module in self.modules:
                module.write_layer()

    # ----------------------------------------------------------------- importance
    def _attach_hooks(self) -> None:
        self._detach_hooks()
        for module in self.modules:
            module.delta_grad = None
            layer = module.layer
            if layer.dropout is not None:
                self.hooks.append(layer.dropout.register_forward_hook(partial(self._on_dropout, module)))
            self.hooks.append(layer.register_forward_hook(partial(self._on_forward, module)))

    def _detach_hooks(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
        for module in self.modules:
            module.dropped = None

    @staticmethod
    def _on_dropout(module: _Module, _layer, _args, output) -> None:
        module.dropped = output

    @staticmethod
    def _on_forward(module: _Module, layer, args, output) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad) or layer.merged or layer.disabled:
            return
        h = (module.dropped if module.dropped is not None else args[0]).detach()
        module.dropped = None

        def accumulate(grad: torch.Tensor) -> None:
            with torch.no_grad(), torch.autocast(grad.device.type, enabled=False):
                g = grad.reshape(-1, layer.out_features).to(layer.factor_dtype)
                x = h.reshape(-1, layer.in_features).to(layer.factor_dtype)
                part = g.T @ x  # ∂L/∂ΔW of this micro-batch (nn.Linear layout)
                module.delta_grad = part if module.delta_grad is None else module.delta_grad.add_(part)

        output.register_hook(accumulate)

    def _update_scores(self, state: TrainingState) -> None:
        distributed = (
            state.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        )
        if distributed and self.settings["sync"] == "gradients":
            for module in self.modules:
                grad = module.delta_grad
                if grad is None:
                    layer = module.layer
                    grad = torch.zeros(
                        layer.out_features, layer.in_features, device=layer.A.device, dtype=layer.factor_dtype
                    )
                torch.distributed.all_reduce(grad)
                module.delta_grad = grad / state.num_processes
        with torch.no_grad():
            scores = torch.stack([importance(m.layer.delta_linear().detach(), m.delta_grad) for m in self.modules])
        self.last_local_scores = scores.tolist()
        if distributed and self.settings["sync"] == "scores" and self.reduce_scores:
            torch.distributed.all_reduce(scores)
            scores /= state.num_processes
            torch.distributed.broadcast(scores, src=0)  # the same bits on every process, whatever the reduction
        for module, score in zip(self.modules, scores.tolist(), strict=True):
            module.ipt, module.unc = smooth(
                module.ipt, module.unc, score, self.settings["beta1"], self.settings["beta2"]
            )
            module.delta_grad = None

    def scores(self) -> dict[str, float]:
        """Ī·Ū per module: what the next growth ranks by."""
        return {m.name: m.ipt * m.unc for m in self.modules}

    # ----------------------------------------------------------------- gradients and the optimizer
    def _collect_gradients(self) -> None:
        """The true factors' gradients from the layer's (chain rule through B_layer = B·diag(c·E/s)), plus the
        orthogonality regulariser's exact gradient; the layer's own gradients are cleared (the run's optimizer
        then steps nothing)."""
        coefficient = self.settings["orth"] / (2 * len(self.modules))
        with torch.no_grad():
            for module in self.modules:
                layer, grad, data = module.layer, module.grad, module.data
                for key in KINDS:
                    grad[key].zero_()
                if layer.A.grad is not None:
                    grad["A"].copy_(layer.A.grad)
                if layer.B.grad is not None:
                    grad_b = layer.B.grad.T  # R x out
                    grad["Bt"].copy_(grad_b * module.effective()[:, None])
                    grad["E"].copy_((data["Bt"] * grad_b).sum(dim=1) * module.scale_ratio)
                layer.A.grad = None
                layer.B.grad = None
                if coefficient > 0:
                    used = module.used
                    for key in ("A", "Bt"):
                        _, orth_grad = orthogonality(data[key][:used])
                        grad[key][:used].add_(orth_grad, alpha=coefficient)

    def _warmup_factor(self, since: int, step: int) -> float:
        if since == FROM_START or not self.settings["rewarm_steps"]:
            return 1.0
        return min(1.0, (step - since - 1) / self.settings["rewarm_steps"])

    def _add_group(self, since: int, next_step: int) -> None:
        """The optimizer group of everything that joined at step `since` (it trains from step since + 1): Parameters
        aliasing those rows, their gradients and Adam moments aliasing the fixed-size tensors."""
        taken = float(max(next_step - since - 1, 0))  # optimizer steps the group has taken before `next_step`
        params, states = [], []
        for module in self.modules:
            parts = [(key, run) for key in ("A", "Bt") for run in _runs(module.ab_since, since)]
            parts += [("E", run) for run in _runs(module.e_since, since)]
            for key, (a, b) in parts:
                param = nn.Parameter(module.data[key][a:b], requires_grad=False)
                param.grad = module.grad[key][a:b]
                params.append(param)
                states.append(
                    {
                        "step": torch.tensor(taken),
                        "exp_avg": module.exp_avg[key][a:b],
                        "exp_avg_sq": module.exp_avg_sq[key][a:b],
                    }
                )
        group = {"params": params, "since": since, "lr": 0.0}
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW([group], lr=0.0, **self.defaults)
        else:
            self.optimizer.add_param_group(group)
        for param, param_state in zip(params, states, strict=True):
            self.optimizer.state[param] = param_state

    # ----------------------------------------------------------------- growth
    def _grow(self, step: int) -> None:
        remaining = self.budget - self.total
        room = [m.capacity - m.used for m in self.modules]
        picked = allocate(
            [m.ipt * m.unc for m in self.modules], room, self.settings["top_h"], self.increment, remaining
        )
        if not picked:
            return
        advance = self.settings["advance"]
        with torch.no_grad():
            for index, gain in picked.items():
                module = self.modules[index]
                for j in range(module.active, module.active + gain):  # the oldest reserves become active
                    module.e_since[j] = step
                    if not advance:
                        module.ab_since[j] = step
                for j in range(module.used, module.used + gain):  # new reserves (drawn at the start)
                    module.data["E"][j] = RESERVE_E if advance else 0.0
                    if advance:
                        module.ab_since[j] = step
                module.active += gain
                module.used += gain
        self._add_group(step, step + 1)
        self.events.append([step, {self.modules[i].name: gain for i, gain in sorted(picked.items())}])
        if self.total >= self.budget:
            self.done = True
            self._switch_off_reserves()

    def _switch_off_reserves(self) -> None:
        with torch.no_grad():
            for module in self.modules:
                module.data["E"][module.active : module.used] = 0.0

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {
            "done": self.done,
            "finished": self.finished,
            "events": self.events,
            "modules": {
                m.name: {
                    "active": m.active,
                    "used": m.used,
                    "ab_since": m.ab_since,
                    "e_since": m.e_since,
                    "ipt": m.ipt,
                    "unc": m.unc,
                }
                for m in self.modules
            },
        }

    def state_tensors(self, model) -> dict:
        tensors = {}
        for m in self.modules:
            tensors[f"{m.name}.Bt"] = m.data["Bt"]
            tensors[f"{m.name}.E"] = m.data["E"]
            for key in KINDS:
                tensors[f"{m.name}.exp_avg.{key}"] = m.exp_avg[key]
                tensors[f"{m.name}.exp_avg_sq.{key}"] = m.exp_avg_sq[key]
        return tensors

    def load_state_dict(self, state: dict, tensors: dict, model) -> None:
        # applied in on_train_begin, once the runtime has placed the model (the optimizer aliases its storage)
        self.restored = (state, tensors) if state.get("modules") else None

    def _restore(self, state: dict, tensors: dict) -> None:
        self.done, self.finished = state["done"], state["finished"]
        self.events = state["events"]
        for m in self.modules:
            saved = state["modules"][m.name]
            m.active, m.used = saved["active"], saved["used"]
            m.ab_since, m.e_since = list(saved["ab_since"]), list(saved["e_since"])
            m.ipt, m.unc = saved["ipt"], saved["unc"]
            with torch.no_grad():
                for key in ("Bt", "E"):
                    m.data[key].copy_(tensors[f"{m.name}.{key}"])
                for key in KINDS:
                    m.exp_avg[key].copy_(tensors[f"{m.name}.exp_avg.{key}"])
                    m.exp_avg_sq[key].copy_(tensors[f"{m.name}.exp_avg_sq.{key}"])

    # ----------------------------------------------------------------- the result
    def ranks(self) -> dict[str, int]:
        return {m.name: m.active for m in self.modules}

    def report(self) -> dict:
        """Figures of the run: per-module ranks, the budget, and trained vs saved parameter counts."""
        return {
            "ranks": self.ranks(),
            "total_rank": self.total,
            "budget": self.budget,
            "growth_events": len(self.events),
            "saved_parameters": sum(m.active * (m.layer.in_features + m.layer.out_features) for m in self.modules),
            "trained_parameters": sum(m.trained_parameters() for m in self.modules),
            "capacity_parameters": sum(m.capacity * (m.layer.in_features + m.layer.out_features) for m in self.modules),
        }

    def final_factors(self, module: _Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the module's active components as a plain LoRA of scale 1: A_act, c·B_act·diag(E_act)."""
        r = module.active
        c = module.layer.config.alpha / r
        a = module.data["A"][:r].detach().clone()
        b = (module.data["Bt"][:r] * (module.data["E"][:r] * c)[:, None]).T.contiguous()
        return a, b

    def final_layers(self, model) -> dict:
        """The final adapter: one plain LoRA per module of its active rank r_i (alpha = r_i: scale 1), the reserves
        dropped."""
        own = {m.name: m for m in self.modules}
        result = {}
        for name, layer in adapter_layers(model):
            result[name] = plain_lora(layer, *self.final_factors(own[name]))
        return result

    def layers_to_save(self, model) -> dict:
        return self.final_layers(model)
