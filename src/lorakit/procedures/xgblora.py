"""XGBLoRA: Zhang et al., "Less is More: Extreme Gradient Boost Rank-1 Adaption for Efficient Finetuning of LLMs",
arXiv:2410.19694.

Gradient boosting with low-rank weak learners ("boosters"). Training is split into rounds (the paper's boosting
iterations t = 1..T). In round t:

1. `layers` transformer blocks (the paper's L_s; its Table 6 found L_s = 11 of LLaMA3-8B's 32 best) are drawn at
   random, from a generator seeded by (seed, t): the same blocks on every process, on resume, in every run with
   that seed. Only their adapter layers form round t's booster;
2. the booster trains on the current model (the base plus every earlier booster) for the round's steps, on the
   loss plus the regulariser of the paper's Eq. 7, λ(‖A‖² + ‖B‖²) over the booster's factors (OLoRA:
   λ(‖A − A0‖² + ‖B − B0‖²), see below);
3. the booster is folded into the model with the step size α_t of Eq. 8 (option `shrinkage`, default 1: the
   whole booster), and the next round starts with fresh boosters (B = 0, so the output does not jump; an init that
   reads the weight reads W plus the folded boosters, as in `lorakit.procedures.cola`) and a fresh optimizer state
   (Adam's moments and step count: every booster is a new weak learner).

Rounds and steps. The run's --steps is the paper's K (total steps); a round is κ steps, so T = K / κ. Give either
`rounds` (T; rounds start at round(K·j/T), equal segments as in Chain of LoRA) or `round_steps` (κ; rounds start
every κ steps, the last one may be shorter), not both. More rounds than steps gives one step per round.

Rank. --rank is r, the rank of every booster in every picked module. The paper's setting is r = 1 (rank-1
boosters; its Table 5 finds smaller ranks better), so pass --rank 1 for it; lorakit's --rank default (16) is not
changed by the procedure. A module's final rank is r times the number of rounds its block was picked (2r per pick
for OLoRA, whose exact LoRA form has rank 2r); a module whose block was never picked has rank 0.

How it fits lorakit (the paper attaches adapters to the picked layers only, and merges them into W):

- The model is adapted on all targets at the start (`lorakit.adapt`). In a round, the layers outside the picked
  blocks keep B = 0 (ΔW = 0) and are not trained: `after_backward` sets their gradients to None, which AdamW (and
  LoRA-RITE) skip entirely: no moment, no step, no weight decay, so they stay bit-identical to their init. Their
  forward cost (a rank-r product with B = 0) and gradient cost remain; the gradients are still averaged over the
  processes before being dropped, so every process holds the same parameters.
- The regulariser is added exactly as its gradient in `after_backward`: grad += 2λ·p for each trained parameter of
  the picked layers (for LoRA the paper's A and B; for other low-rank methods their trained tensors, e.g. LoRA-XS's
  R). The regulariser is smallest where the booster's ΔW is 0: for every method but OLoRA that is at 0 (B = 0
  or R = 0 at init); an OLoRA booster starts at (A0, B0) with ΔW = s·(B·A − B0·A0), so there λ(‖A‖² + ‖B‖²)
  would pull ΔW towards −s·B0·A0, and lorakit regularises the update instead: grad += 2λ·(p − p0), p0 = A0, B0.
  The loss is the token mean over the global batch and gradients are already averaged over the processes when
  `after_backward` runs, so every process adds the same term, once per optimizer step. The gradients are at
  their true scale there in both loops (under fp16 the loop, and inside the Trainer its gradient norm, has
  unscaled them), so 2λ·p is added as is.
- Folding (Eq. 8, W_t = W_{t-1} + α_t·ΔW_t) keeps the booster as exact frozen low-rank factors beside W (the
  layer's `frozen_links`, as in `lorakit.procedures.cola`): W is never written, so nothing is rounded into a bf16
  weight, and the base stays bit-identical. Every round's booster is folded, the last one too (at the final step),
  so the trained model and the saved adapter are the same thing.
- Gradient clipping (option `max_grad_norm`, default 0: none, like `lorakit train`): in `after_backward`, in this
  order: the gradients of the layers outside the round are dropped, 2λ·(p − p0) is added, then the round's
  gradients (loss + regulariser, the gradient of Eq. 7's objective) are clipped to that global norm
  (torch.nn.utils.clip_grad_norm_). The same in both loops: inside transformers' Trainer, which would clip every
  layer's loss gradient before its `on_pre_optimizer_step`, the callback refuses max_grad_norm > 0 in the
  TrainingArguments; set it to 0 and give the procedure its max_grad_norm instead.
- Learning rate: the run's schedule (--schedule, --warmup) runs over all K steps across rounds; only the optimizer
  state restarts at each round.

The final adapter is relative to the ORIGINAL base: per module, every booster it received, concatenated along the
rank as one plain LoRA of that module's own rank R_i (alpha = R_i, scale 1, s·α_t folded into B: the file's
per-module ranks, listed by `lorakit inspect`); modules never picked are left out of the file (rank 0). It loads
onto the original base with the strict check and exports to PEFT with a rank_pattern.

The number of trainable parameters per round (the picked layers' trained tensors) is `trainable_per_round()`;
`describe()` (the run summary's "procedure") ends with it, since the loop's "trainable_parameters" counts every
adapter layer. Works with the low-rank methods Chain of LoRA chains (LoRA, OLoRA, LoRA-Mini, LoRA-XS, MELoRA,
PRoLoRA); MoRA, LoRTA and updates that are not low rank are refused. Not with --fsdp.

Sources and defaults. No official code is public, and the paper's full text was not reachable when this was
written: the equation, table and symbol references above (Eq. 7's λ-regularised objective, Eq. 8's merge step α_t,
κ, K, L_s, Tables 5 and 6) are those of the abstract and the public ICLR 2025 reviews (OpenReview WkhlUyJcOJ).
The defaults (rounds=4, layers=1, lam=1e-3, shrinkage=1) are ours, not the paper's. Note that with Adam the
λ-gradient is normalised like the loss gradient: while B = 0 (the loss gradient of A is then 0), A shrinks by up
to lr per step however small λ is.
"""

from __future__ import annotations

import bisect
import hashlib
import re

import torch

from ..errors import ConfigError
from ..inject import adapter_layers, shared_parameters
from ..options import Option
from . import register_procedure
from .base import Procedure, TrainingState, plain_lora
from .cola import link_tensors, restart, restore_links, with_links


def round_generator(seed: int, round_index: int) -> torch.Generator:
    digest = hashlib.sha256(f"lorakit:xgblora:{seed}:{round_index}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def picked_blocks(seed: int, round_index: int, blocks: int, layers: int) -> list[int]:
    """Indices (sorted) of the `layers` blocks of `blocks` that train in round `round_index`."""
    order = torch.randperm(blocks, generator=round_generator(seed, round_index))
    return sorted(order[:layers].tolist())


def regulariser_origin(layer) -> dict[str, torch.Tensor]:
    """The trained tensors' values where the booster's ΔW is 0 and its regulariser is smallest: OLoRA's (A0, B0)
    (ΔW = s·(B·A − B0·A0)); absent (0) for every other method."""
    if layer.method == "olora":
        return {"A": layer.A0, "B": layer.B0}
    return {}


def booster_factors(layer, shrinkage: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, α·s·B) of the layer's live booster, copied (the next round re-initialises the parameters)."""
    a, b = (t.detach().to(layer.factor_dtype, copy=True) for t in layer.export_factors())
    return a, b * (layer.scale * shrinkage)


@register_procedure
class XGBLora(Procedure):
    name = "xgblora"
    options = {
        "rounds": Option(4, int, "boosting rounds T, equal segments of --steps (or give round_steps)", minimum=1),
        "round_steps": Option(
            0, int, "steps per round κ (0: --steps / rounds); the last round may be shorter", minimum=0
        ),
        "layers": Option(1, int, "transformer blocks L_s trained per round, drawn from (seed, round)", minimum=1),
        "lam": Option(
            1e-3, float, "λ of the regulariser λ(‖A‖² + ‖B‖²) on each round's factors (OLoRA: A − A0, B − B0)",
            minimum=0.0,
        ),
        "shrinkage": Option(
            1.0, float, "α_t: fraction of each round's booster folded in (Eq. 8)", minimum=0.0, maximum=1.0
        ),
        "max_grad_norm": Option(
            0.0, float, "clip the round's gradient (loss + regulariser) to this norm (0: no clipping)", minimum=0.0
        ),
    }
    # inside the Trainer, whose own clipping would come first and span every layer (see the module doc)
    clips_gradients = True

    def __init__(self, options: dict):
        super().__init__(options)
        if options.get("round_steps") and "rounds" in options:
            raise ConfigError(
                "--procedure xgblora: give rounds (equal segments of --steps) or round_steps (steps per round), not both"
            )
        if self.settings["shrinkage"] <= 0:
            raise ConfigError(
                "--procedure xgblora: shrinkage must be > 0 (the fraction of each booster kept); use e.g. 1"
            )
        self.round: int | None = None  # the round in progress (None: no hook has run yet)
        self.picks: set[str] | None = None  # module names that train in that round (empty after the last fold)
        self.per_round: list[int] | None = None
        self._blocks: tuple[int, list[str], dict[str, int]] | None = None  # (id(model), block names, module -> block)

    # ----------------------------------------------------------------- rounds and blocks
    def round_starts(self, total_steps: int) -> list[int]:
        """The steps (0-based) at which a round begins; the first is 0."""
        kappa = self.settings["round_steps"]
        if kappa:
            return list(range(0, total_steps, kappa))
        rounds = self.settings["rounds"]
        return sorted({round(total_steps * j / rounds) for j in range(rounds)} - {total_steps}) or [0]

    def round_of(self, step: int, total_steps: int) -> int:
        return max(bisect.bisect_right(self.round_starts(total_steps), step) - 1, 0)

    def blocks(self, model) -> tuple[list[str], dict[str, int]]:
        """(names of the transformer blocks that hold adapter layers, {adapter module: index into those names})."""
        if self._blocks is not None and self._blocks[0] == id(model):
            return self._blocks[1], self._blocks[2]
        from ..training.distributed import transformer_blocks

        names = {id(module): name for name, module in model.named_modules()}
        found = [names[id(block)] for block in transformer_blocks(model) if id(block) in names]
        owner = {}
        for name, _ in adapter_layers(model):
            block = next((b for b in found if name.startswith(b + ".")), None)
            if block is None:
                if not found:
                    raise ConfigError(
                        f"--procedure xgblora trains whole transformer blocks, but {type(model).__name__} has no "
                        "repeated blocks (like model.layers.N); use another procedure"
                    )
                example = next((b for b in found if re.search(r"\.\d+$", b)), found[0])
                inside = re.sub(r"\\\.\d+$", r"\\.\\d+", re.escape(example)) + r"\..*"
                raise ConfigError(
                    f"--procedure xgblora trains whole transformer blocks, but {name} is in none (blocks are like "
                    f"{example}); adapt modules inside the blocks only, e.g. --targets '{inside}'"
                )
            owner[name] = block
        used = [b for b in found if b in set(owner.values())]
        index = {b: i for i, b in enumerate(used)}
        module_block = {name: index[block] for name, block in owner.items()}
        self._blocks = (id(model), used, module_block)
        return used, module_block

    def picked_modules(self, model, seed: int, round_index: int) -> set[str]:
        names, module_block = self.blocks(model)
        chosen = set(picked_blocks(seed, round_index, len(names), min(self.settings["layers"], len(names))))
        return {name for name, block in module_block.items() if block in chosen}

    def trainable_per_round(self, model, seed: int, total_steps: int) -> list[int]:
        """Trainable parameters of each round's booster (the picked layers' trained tensors)."""
        sizes = {
            name: sum(p.numel() for p in layer.trainable_parameters().values()) for name, layer in adapter_layers(model)
        }
        return [
            sum(sizes[name] for name in self.picked_modules(model, seed, j))
            for j in range(len(self.round_starts(total_steps)))
        ]

    # ----------------------------------------------------------------- checks
    def check_model(self, model) -> None:
        if shared_parameters(model) is not None:
            raise ConfigError(
                "--procedure xgblora cannot boost lorta (one tensor shared by all layers); use another method"
            )
        for name, layer in adapter_layers(model):
            if layer.method == "mora":
                raise ConfigError(
                    "--procedure xgblora cannot boost mora: its rank differs per module (r̂ from in + out); use "
                    "another method"
                )
            if layer.export_factors() is None:
                raise ConfigError(
                    f"--procedure xgblora needs a low-rank update per layer, but {layer.method} on {name} is not low "
                    "rank; use a low-rank method (e.g. lora)"
                )
        names, _ = self.blocks(model)
        if self.settings["layers"] > len(names):
            raise ConfigError(
                f"--procedure xgblora:layers={self.settings['layers']} but the adapted model has {len(names)} "
                f"transformer blocks; use layers <= {len(names)}"
            )

    # ----------------------------------------------------------------- the hooks
    def enter(self, state: TrainingState, round_index: int) -> None:
        self.round = round_index
        self.picks = self.picked_modules(state.model, state.seed, round_index)

    def on_train_begin(self, state: TrainingState) -> None:
        self.enter(state, self.round_of(state.step, state.total_steps))
        self.per_round = self.trainable_per_round(state.model, state.seed, state.total_steps)

    def before_step(self, state: TrainingState) -> None:
        round_index = self.round_of(state.step, state.total_steps)
        if self.round != round_index:  # only without on_train_begin (the loop always calls it)
            self.enter(state, round_index)

    @torch.no_grad()
    def after_backward(self, state: TrainingState) -> None:
        if self.picks is None:
            self.before_step(state)
        twice_lam = 2.0 * self.settings["lam"]  # the gradients are unscaled here (fp16: see procedures.base)
        trained = []
        for name, layer in adapter_layers(state.model):
            params = layer.trainable_parameters().values()
            if name not in self.picks:
                for param in params:
                    param.grad = None  # skipped by the optimizer: no moments, no step, no weight decay
            elif twice_lam:
                origin = regulariser_origin(layer)
                for key, param in layer.trainable_parameters().items():
                    # d/dp λ‖p − p0‖² = 2λ(p − p0), added once to the global-mean gradient
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    offset = param.detach() if key not in origin else param.detach() - origin[key].to(param.dtype)
                    param.grad.add_(offset, alpha=twice_lam)
            if name in self.picks:
                trained += [param for param in params if param.grad is not None]
        if self.settings["max_grad_norm"] and trained:  # the same on every process: the gradients are averaged
            torch.nn.utils.clip_grad_norm_(trained, self.settings["max_grad_norm"])

    def after_optimizer_step(self, state: TrainingState) -> None:
        done = state.step + 1
        if done in self.round_starts(state.total_steps) or done == state.total_steps:
            self.end_round(state, done)

    @torch.no_grad()
    def end_round(self, state: TrainingState, done: int) -> None:
        """Fold the round's booster into the frozen factors; fresh boosters and optimizer state for the next."""
        ending = self.round_of(done - 1, state.total_steps)
        finished = self.picked_modules(state.model, state.seed, ending)
        following = ending + 1
        upcoming = self.picked_modules(state.model, state.seed, following) if done < state.total_steps else set()
        for name, layer in adapter_layers(state.model):
            if name in finished:
                layer.frozen_links = with_links(layer, *booster_factors(layer, self.settings["shrinkage"]))
            if name in finished or name in upcoming:
                restart(layer, following)  # a fresh draw per round, from W + the folded boosters
        state.optimizer.state.clear()  # Adam's moments and step count start again
        self.round, self.picks = following, upcoming

    # ----------------------------------------------------------------- state and result
    def state_dict(self) -> dict:
        return {"round": self.round}

    def state_tensors(self, model) -> dict:
        tensors = {}
        for name, layer in adapter_layers(model):
            tensors.update(link_tensors(name, layer))
        return tensors

    def load_state_dict(self, state: dict, tensors: dict, model) -> None:
        self.round = state.get("round")
        for name, layer in adapter_layers(model):
            if f"{name}.A" in tensors:
                restore_links(name, layer, tensors)  # the live booster was derived from W + the folded boosters

    def layers_to_save(self, model) -> dict | None:
        """Every booster each module received, one plain LoRA of the module's own rank (scale 1); modules never
        picked are left out."""
        result = {}
        for name, layer in adapter_layers(model):
            live = self.picks is None or name in self.picks  # a booster still training (outside a full run)
            if live:
                a, b = with_links(layer, *booster_factors(layer))
            elif layer.frozen_links is not None:
                a, b = layer.frozen_links
            else:
                continue
            result[name] = plain_lora(layer, a, b)
        return result or None

    def report(self) -> dict:
        return {"trainable_per_round": list(self.per_round or [])}

    def describe(self) -> str:
        text = super().describe()
        if self.per_round:
            values = sorted(set(self.per_round))
            shown = str(values[0]) if len(values) == 1 else "/".join(map(str, self.per_round))
            text += f" trainable_per_round={shown}"
        return text
