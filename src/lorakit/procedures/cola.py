"""Chain of LoRA (COLA): Xia et al., "Chain of LoRA: Efficient Fine-tuning of Language Models via Residual
Learning", arXiv:2401.04151.

Training is split into `links` equal segments. At each knot between two links (paper, Algorithm 1: "tie a knot",
then "extend the chain"):

1. the finished link's update s·B_j·A_j is folded into the model;
2. a fresh adapter of the same method and rank starts (its own init, drawn with seed + j: B = 0, so the model's
   output does not jump) on the merged model: a data-dependent init reads W + ΣΔW, the base plus the folded links
   (`AdapterLayer.init_weight_linear`: OLoRA's QR, LoRA-XS's SVD), as "merge, then start a fresh adapter" does in
   the paper, without writing W;
3. the optimizer state is reset, including Adam's step count (the paper re-initialises the optimisation for each
   link).

Folding. The paper merges ΔW into W. lorakit keeps finished links instead as frozen low-rank factors beside W,
concatenated per module: (A_chain, B_chain) of rank Σ r_j, computed as one extra low-rank product (the layer's
`frozen_links`). Merging into W would round W + ΔW to the base dtype, and in bf16 that loses most of a small ΔW;
the frozen factors are exact in every dtype, the base weight is never written, and the result reproduces in
`lorakit eval`. The cost is r·(in + out) more multiply-adds per token and link, and as many frozen floats.

Learning rate at a knot (the paper does not say; our choice, option `schedule`): "continue" (default) keeps
the global schedule running across links; "rewarm" also ramps the rate linearly from 0 over `rewarm_steps`
steps after each knot.

The final adapter is relative to the ORIGINAL base: every link's exact LoRA form (`export_factors`) and the last
link, concatenated into one plain LoRA of rank Σ r_j (alpha = rank, so its scale is 1 and s is folded into B). It
loads onto the original base with the strict check, and exports to PEFT as any LoRA. Works with every method whose
update is low rank, per layer and of one rank in every layer (LoRA, OLoRA (rank 2r per link), LoRA-Mini,
LoRA-XS, MELoRA, PRoLoRA); MoRA (rank r̂ differs per module; `rope` is not low rank) and LoRTA (one tensor shared
by all layers) are refused.

LoRA-Mini stays compact: every link of a module shares the frozen outer matrices (they come from (seed, module) or
the base weight, not from the link's seed), so the chain is Σ_j s·B_out B_in,j A_in,j A_out = B_out [s·B_in,1 …]
[A_in,1; …] A_out, one LoRA-Mini of inner rank Σ r_j (alpha = rank: scale 1). The file holds those inner
matrices, Σ r_j·(a + b) floats per module, not dense rank-Σ r_j factors; the finished links' inner matrices are
kept beside their dense form (`inner_links`, in the checkpoint too). With `mini_outer=qr` this is also the paper's
W + ΣΔW: every link's ΔW = B_out (…) A_out lies in span(B_out) × span(A_out), the spans of W's first b columns and
first a rows, so W + ΣΔW's first b columns and a rows span the same subspaces (for a generic W); only the basis
inside them, in which A_in is drawn, stays W's.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import BaseModelMismatchError, ConfigError
from ..fingerprint import RECOMPUTE_TOLERANCE, sketch_change, update_sketch
from ..inject import adapter_layers, shared_parameters
from ..options import Option
from . import register_procedure
from .base import Procedure, TrainingState, plain_lora


def chained_factors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, s·B) of the finished links and the current one, concatenated along the rank."""
    # copies: export_factors may return views of the trained parameters, which the next link re-initialises
    a, b = (t.detach().to(layer.factor_dtype, copy=True) for t in layer.export_factors())
    return with_links(layer, a, b * layer.scale)


def restart(layer, offset: int) -> None:
    """Start a fresh link on `layer`: its frozen derived tensors recomputed from W + ΣΔW (the links just folded),
    then the method's own init drawn with seed + offset."""
    layer.rederive()
    original = layer.config
    layer.config = dataclasses.replace(original, seed=original.seed + offset)  # a fresh draw per link
    try:
        layer.initialize()
    finally:
        layer.config = original


def link_tensors(name: str, layer) -> dict[str, torch.Tensor]:
    """The layer's frozen links (A, B) for a checkpoint, with the sketch of the update of the frozen factors derived
    from W + ΣΔW (OLoRA, LoRA-XS: the adapter file alone cannot rebuild them, so it holds no sketch of them)."""
    if layer.frozen_links is None:
        return {}
    tensors = {f"{name}.A": layer.frozen_links[0], f"{name}.B": layer.frozen_links[1]}
    recomputed = layer.recomputed_factors()
    if layer.derives_from_links and recomputed is not None:
        tensors[f"{name}.update_sketch"] = update_sketch(*recomputed, layer.scale)
    return tensors


def restore_links(name: str, layer, tensors: dict[str, torch.Tensor]) -> None:
    """Set the layer's frozen links from a checkpoint's tensors (`link_tensors`) and rederive the frozen factors of
    its live link from W + ΣΔW, checked against the saved sketch (refused past `RECOMPUTE_TOLERANCE`: another base,
    or one in another dtype, whose factors rotate)."""
    device = layer.base_layer.weight.device
    layer.frozen_links = tuple(
        tensors[f"{name}.{key}"].to(device=device, dtype=layer.factor_dtype) for key in ("A", "B")
    )
    layer.rederive()
    saved = tensors.get(f"{name}.update_sketch")
    if saved is not None and layer.recomputed_factors() is not None:
        change = sketch_change(saved.double().cpu(), update_sketch(*layer.recomputed_factors(), layer.scale))
        if change > RECOMPUTE_TOLERANCE:
            raise BaseModelMismatchError(
                f"{layer.method} rebuilds the live link's frozen factors from the base plus the finished links, and "
                f"on this base they change {layer.recomputed_part} of {name} by about {change:.0%}",
                "resume on the base the run was trained on",
            )


def with_links(layer, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) appended to the layer's frozen links along the rank (the links first)."""
    if layer.frozen_links is not None:
        a = torch.cat([layer.frozen_links[0], a])
        b = torch.cat([layer.frozen_links[1], b], dim=1)
    return a.contiguous(), b.contiguous()


@register_procedure
class ChainOfLora(Procedure):
    name = "cola"
    options = {
        "links": Option(3, int, "segments of training, each with a fresh adapter", minimum=1),
        "schedule": Option("continue", str, "learning rate at a knot: continue, or rewarm", ("continue", "rewarm")),
        "rewarm_steps": Option(10, int, "steps of the linear re-warm-up after each knot (schedule=rewarm)", minimum=1),
    }

    def __init__(self, options: dict):
        super().__init__(options)
        self.link = 0  # finished links
        self.knot_step = 0  # the optimizer step at which the current link began
        self.inner_links: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # LoRA-Mini: (A_in, s·B_in) chained

    def knots(self, total_steps: int) -> list[int]:
        """Steps after which a link ends: equal segments of the run."""
        links = self.settings["links"]
        return sorted({round(total_steps * j / links) for j in range(1, links)} - {0, total_steps})

    def check_model(self, model) -> None:
        if shared_parameters(model) is not None:
            raise ConfigError("--procedure cola cannot chain lorta (one tensor shared by all layers); use another method")
        for name, layer in adapter_layers(model):
            if layer.method == "mora":
                raise ConfigError(
                    "--procedure cola cannot chain mora: its rank differs per module (r̂ from in + out); use "
                    "another method"
                )
            if layer.export_factors() is None:
                raise ConfigError(
                    f"--procedure cola needs a low-rank update per layer, but {layer.method} on {name} is not low "
                    "rank; use one of the methods it chains: lora, olora, mini, loraxs, melora or prolora"
                )

    def after_optimizer_step(self, state: TrainingState) -> None:
        done = state.step + 1
        if done in self.knots(state.total_steps):
            self.tie_knot(state, done)
        elif self.settings["schedule"] == "rewarm" and self.link > 0:
            self.rewarm(state, done)

    @torch.no_grad()
    def tie_knot(self, state: TrainingState, done: int) -> None:
        self.link += 1
        self.knot_step = done
        for name, layer in adapter_layers(state.model):
            layer.frozen_links = chained_factors(layer)
            if layer.method == "mini":
                self.inner_links[name] = self.chained_inner(name, layer)
            restart(layer, self.link)
        state.optimizer.state.clear()  # Adam's moments and step count start again
        if self.settings["schedule"] == "rewarm":
            self.rewarm(state, done)

    def chained_inner(self, name: str, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA-Mini: (A_in, s·B_in) of the finished links and the current one, concatenated along the rank."""
        a, b = layer.A_in.detach().clone(), layer.B_in.detach() * layer.scale
        if name in self.inner_links:
            a = torch.cat([self.inner_links[name][0], a])
            b = torch.cat([self.inner_links[name][1], b], dim=1)
        return a.contiguous(), b.contiguous()

    def rewarm(self, state: TrainingState, done: int) -> None:
        """Scale the next step's rate (just set by the scheduler) by the re-warm-up factor."""
        since = done - self.knot_step
        if since < self.settings["rewarm_steps"]:
            for group in state.optimizer.param_groups:
                group["lr"] *= (since + 1) / (self.settings["rewarm_steps"] + 1)

    def state_dict(self) -> dict:
        return {"link": self.link, "knot_step": self.knot_step}

    def state_tensors(self, model) -> dict:
        tensors = {}
        for name, layer in adapter_layers(model):
            tensors.update(link_tensors(name, layer))
            if name in self.inner_links:
                tensors[f"{name}.A_in"], tensors[f"{name}.B_in"] = self.inner_links[name]
        return tensors

    def load_state_dict(self, state: dict, tensors: dict, model) -> None:
        self.link, self.knot_step = state.get("link", 0), state.get("knot_step", 0)
        for name, layer in adapter_layers(model):
            device = layer.base_layer.weight.device
            if f"{name}.A" in tensors:
                restore_links(name, layer, tensors)  # the live link was derived from W + ΣΔW
            if f"{name}.A_in" in tensors:
                self.inner_links[name] = tuple(
                    tensors[f"{name}.{key}"].to(device=device, dtype=layer.factor_dtype) for key in ("A_in", "B_in")
                )

    def layers_to_save(self, model) -> dict:
        """Every link and the current one as one plain LoRA per module (scale 1), relative to the original base;
        LoRA-Mini as one LoRA-Mini of the chained inner matrices."""
        result = {}
        for name, layer in adapter_layers(model):
            if layer.method == "mini":
                a_in, b_in = self.chained_inner(name, layer)
                rank = a_in.shape[0]
                config = dataclasses.replace(layer.config, r=rank, alpha=rank, rslora=False)
                mini = type(layer)(layer.base_layer, config, name, initialize=False, fingerprint=layer.base_fingerprint)
                mini.load_tensors({"A_in": a_in, "B_in": b_in})
                result[name] = mini
                continue
            result[name] = plain_lora(layer, *chained_factors(layer))
        return result
