"""`AdaptedLayer`: what the model holds in place of an adapted module, the host of its named adapters.

    y = base(x) + Σ_{a ∈ active} s_a·ΔW_a·x                    (one or several adapters active)
    y_i = base(x_i) + s_{a(i)}·ΔW_{a(i)}·x_i                    (a mixed batch: row i uses adapter a(i), or none)

The split follows shared/STYLE.md ("Several adapters"): the host owns the base layer, the base's state (disabled,
Flat-LoRA's ε) and the routing of rows; each adapter is a `lorakit.layer.AdapterLayer`, one method's tensors and
math, unchanged by how many others share the base. PEFT instead keeps one `ModuleDict` per tensor inside the layer
(`lora_A[name]`), so every method edits the same dicts; vLLM's Punica wrapper stacks every adapter's factors for
the batched product, which `lorakit.routing` does in plain torch.

Parameter names: `<module>.base_layer.weight` as before, and `<module>.adapters.<name>.<tensor>` for an adapter's.
Adapter files keep `<module>.<tensor>`: a file holds one adapter, whatever its name in a model.
"""

from __future__ import annotations

import torch
from torch import nn

from .base_layers import frozen_base
from .layer import AdapterLayer, frozen_output
from .routing import routed_forward

BASE_ROW_NAMES = ("base", "__base__")  # a mixed batch's name for a row without an adapter (PEFT: "__base__")


class AdaptedLayer(nn.Module):
    """A frozen base layer with named adapters; `active` ones add their updates (in order), others are idle."""

    lorakit_host = True  # `lorakit.base_layers.frozen_base` of a host is its base's

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "frozen", frozen_base(base_layer))
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.weight_noise = None  # Flat-LoRA's ε during a training step: has .perturbed(W) -> W + ε
        self.routing = None  # a mixed batch's `lorakit.routing.Routing`, set for one forward of the model

    def __getattr__(self, name: str):
        """With a single adapter, its attributes read through the host (`q_proj.A`, `q_proj.merge()`), as on the
        one-adapter layers of lorakit 0.1; with several, name one: `q_proj.adapters["b"].A`."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            adapters = self.__dict__["_modules"].get("adapters")
            if adapters is not None and len(adapters) == 1 and not name.startswith("_"):
                return getattr(next(iter(adapters.values())), name)
            raise

    def add(self, name: str, layer: AdapterLayer) -> None:
        object.__setattr__(layer, "host", self)
        layer.adapter_name = name
        self.adapters[name] = layer

    def remove(self, name: str) -> AdapterLayer:
        layer = self.adapters[name]
        del self.adapters[name]
        object.__setattr__(layer, "host", None)
        return layer

    def active_layers(self) -> list[AdapterLayer]:
        return [self.adapters[name] for name in self.active if name in self.adapters]

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_output(self.frozen, self.weight_noise, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_output(x)
        if self.routing is not None:
            return routed_forward(self, x, self.routing)
        out = None
        for layer in self.active_layers():  # called as modules: hooks on an adapter see (x, running sum) -> sum
            out = layer(x, out)
        return self.base_output(x) if out is None else out

    @torch.no_grad()
    def restore_base(self) -> nn.Module:
        """The base layer holding its original weight: bit-exact unless an adapter was merged (then unmerged here,
        exact up to one rounding)."""
        for layer in self.adapters.values():
            if layer.merged:
                layer.unmerge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"active={list(self.active)}"
