"""`AdapterLayer`: the one shared wrapper around a frozen linear layer.

    y = base_layer(x) + s * B (A x)          (A: r x in, B: out x r, s = alpha / r)

A method (one file in `lorakit/methods/`) subclasses it and supplies only what differs:

- `build()`: create its parameters and buffers (and regenerate frozen random ones from the seed),
- `initialize()`: draw the trained factors that start random (OLoRA: factor the weight),
- `factors()`: the effective (A, B) of its update ΔW = B A, on which forward / merge / delta_weight are built;
  a method whose update is not such a product overrides `add_update` (forward) and `delta_linear` (merge),
- `trainable`: the names of its trained parameters, `stored`: the tensors a file must keep.

Forward, merge, unmerge, disable and unload live here, once. No method changes the base weight outside `merge`,
so `disabled()` and `unload()` give the original weights bit for bit. Both nn.Linear (weight out x in) and transformers'
Conv1D (GPT-2, weight in x out) are handled by reading the weight in the nn.Linear layout.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .config import AdapterConfig
from .errors import ConfigError
from .fingerprint import Fingerprint
from .options import Option

try:  # transformers is a dependency, but keep the layer importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None

# layer type -> whether its weight is stored transposed (in x out) relative to nn.Linear
SUPPORTED_LAYERS: dict[type, bool] = {nn.Linear: False}
if Conv1D is not None:
    SUPPORTED_LAYERS[Conv1D] = True


def is_supported_layer(module: nn.Module) -> bool:
    return type(module) in SUPPORTED_LAYERS


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported layer."""
    weight = module.weight
    return (weight.shape[0], weight.shape[1]) if SUPPORTED_LAYERS[type(module)] else (weight.shape[1], weight.shape[0])


class AdapterLayer(nn.Module):
    """Base class of every adapted layer; see the module docstring for the contract a method fulfils."""

    method: ClassVar[str] = ""
    trainable: ClassVar[tuple[str, ...]] = ()
    stored: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, Option]] = {}  # the method's keys in AdapterConfig.extra
    recomputed_part: ClassVar[str] = "the update"  # what `recomputed_factors` gives, in words

    def __init__(
        self,
        base_layer: nn.Module,
        config: AdapterConfig,
        name: str,
        *,
        initialize: bool = True,
        fingerprint: Fingerprint | None = None,
        shared: SharedParameters | None = None,
    ):
        super().__init__()
        # a plain reference, not a submodule: the owner is registered once on the model (see `SharedParameters`)
        object.__setattr__(self, "shared", shared)
        # Taken first, before anything (OLoRA, merge, FSDP sharding) could change or split the weight.
        self.base_fingerprint = fingerprint or Fingerprint.of(base_layer.weight)
        self.base_layer = base_layer
        self.name = name
        self.config = config
        self.fan_in_fan_out = SUPPORTED_LAYERS[type(base_layer)]
        self.in_features, self.out_features = linear_shape(base_layer)
        self.r = config.r
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.merged = False
        self.disabled = False
        self.weight_noise = None  # Flat-LoRA's ε during a training step: has .perturbed(W) -> W + ε
        # Chain of LoRA's finished links, frozen: (A, s·B) of rank Σ r_j, added to the update (plain tensors, not
        # buffers: a procedure owns and saves them)
        self.frozen_links: tuple[torch.Tensor, torch.Tensor] | None = None
        weight = base_layer.weight
        # Trained factors live in float32 under half-precision bases (their updates are too small for fp16/bf16).
        self.factor_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.build()
        if initialize:
            self.initialize()

    # ----------------------------------------------------------------- what a method supplies
    @classmethod
    def check_config(cls, config: AdapterConfig) -> None:
        """Validate method-specific config fields; raise ConfigError naming the field and the fix."""

    @classmethod
    def check_layer(cls, config: AdapterConfig, name: str, in_features: int, out_features: int) -> None:
        """Validate the config against one layer's shape before anything is mutated."""

    @classmethod
    def stored_shapes(cls, config: AdapterConfig, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the `stored` tensors, known without allocating (files are checked against them)."""
        raise NotImplementedError

    @classmethod
    def legacy_shapes(cls, config: AdapterConfig, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """Tensors that files of earlier lorakit versions store besides `stored` (still read: `load_tensors` gets
        them; OLoRA's A0, B0)."""
        return {}

    @classmethod
    def accepts_file_shapes(cls, config: AdapterConfig, in_features: int, out_features: int, saved: dict) -> bool:
        """Whether a file's {tensor: shape} for one module is this version's layout or an earlier one."""
        expected = cls.stored_shapes(config, in_features, out_features)
        return saved in (expected, expected | cls.legacy_shapes(config, in_features, out_features))

    def build(self) -> None:
        """Create parameters and buffers (zeros for what `initialize` or a file fills in)."""
        raise NotImplementedError

    def initialize(self) -> None:
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective (A, B), A: r x in, B: out x r, with ΔW = B A (unscaled, nn.Linear layout).

        Low-rank methods supply this and get the fused forward, merge and PEFT export from it. A method whose
        update is not a product of two factors (MoRA, MELoRA's batched blocks) overrides `add_update` and
        `delta_linear` instead, and `export_factors` if it can be written as a LoRA.
        """
        raise NotImplementedError

    def after_load(self) -> None:
        """Called after stored tensors were loaded from a file."""

    def file_fields(self) -> dict:
        """Small JSON values a file keeps for this module beside its tensors (LoRA-XS: its sign anchors)."""
        return {}

    def load_file_fields(self, fields: dict) -> None:
        """Apply `file_fields` read from a file (an older file may lack them); raise ValueError if malformed."""

    def recomputed_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of the part s·B·A of the update that depends on frozen factors rebuilt from the base weight when
        a file is loaded (LoRA-XS, LoRA-Mini "qr", OLoRA), or None. A file keeps a sketch of it, and a load checks
        the rebuilt factors against it (`lorakit.fingerprint.update_sketch`)."""
        return None

    @classmethod
    def build_shared(cls, model: nn.Module, config: AdapterConfig, names: list[str]) -> SharedParameters | None:
        """The model-wide tensors every layer of this method reads (LoRTA's CP factors), or None."""
        return None

    def option(self, key: str):
        return self.config.option(key)

    # ----------------------------------------------------------------- the update, three views of it
    def add_update(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + s·ΔW·dropout(x), for x of any leading shape. The default runs the low-rank `factors()`."""
        h = self.dropout(x) if self.dropout is not None else x
        a, b = self.factors()
        return self._add_low_rank(out, h, a, b)

    def delta_linear(self) -> torch.Tensor:
        """s·ΔW as a dense out x in matrix (nn.Linear layout) in the factors' precision."""
        return self._scaled_product(*self.factors())

    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of a plain LoRA with ΔW = B A relative to the ORIGINAL base weight (same scale s), or None
        where the update is not low rank (export then refuses)."""
        return tuple(t.detach() for t in self.factors())

    # ----------------------------------------------------------------- shared machinery
    def new_parameter(self, tensor: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(tensor.to(device=self.base_layer.weight.device, dtype=self.factor_dtype))

    def new_buffer(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor.to(device=self.base_layer.weight.device, dtype=self.factor_dtype))

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self.trainable}

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.stored}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a file's tensors of this module (`stored`, and any `legacy_shapes` ones an older file holds)."""
        with torch.no_grad():
            for name in self.stored:
                getattr(self, name).copy_(tensors[name])
        self.after_load()

    def base_weight_linear(self) -> torch.Tensor:
        """The base weight in nn.Linear layout (out x in), as a view."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def delta_weight(self) -> torch.Tensor:
        """s * ΔW in the layout and dtype of `base_layer.weight` (computed in the factors' precision)."""
        return self._layout(self.delta_linear()).to(self.base_layer.weight.dtype)

    def _scaled_product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b * self.scale) @ a

    def _layout(self, delta_linear: torch.Tensor) -> torch.Tensor:
        return delta_linear.T if self.fan_in_fan_out else delta_linear

    def _add_low_rank(
        self, out: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        """out + scale·B·A·h in the factors' precision (scale defaults to s)."""
        scale = self.scale if scale is None else scale
        if h.dtype != a.dtype:
            h = h.to(a.dtype)
        low = h @ a.T
        if out.dtype == b.dtype and out.is_contiguous():
            # one GEMM computes base + s·B·(A x): no separate update tensor and add. Out of place on purpose: an
            # in-place addmm_ into a view of `out` makes autograd copy the whole gradient (CopySlices), ~10% slower.
            fused = torch.addmm(out.view(-1, out.shape[-1]), low.view(-1, low.shape[-1]), b.T, alpha=scale)
            return fused.view(out.shape)
        return out + (low @ (b.T * scale)).to(out.dtype)

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's output; with `weight_noise` set, that of W + ε, computed from a temporary W + ε so
        that the stored weight is never written (see `lorakit.procedures.flat`)."""
        if self.weight_noise is None:
            return self.base_layer(x)
        weight = self.weight_noise.perturbed(self.base_weight_linear())
        return torch.nn.functional.linear(x, weight, self.base_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_output(x)
        if self.merged or self.disabled:
            return out
        if self.frozen_links is not None:
            out = self._add_low_rank(out, x, *self.frozen_links, scale=1.0)
        return self.add_update(out, x)

    def total_delta_linear(self) -> torch.Tensor:
        """s·ΔW plus any frozen links, dense, nn.Linear layout: what merge folds into the weight."""
        delta = self.delta_linear()
        if self.frozen_links is not None:
            a, b = self.frozen_links
            delta = delta + b @ a
        return delta

    # ----------------------------------------------------------------- merge / unmerge / restore
    @torch.no_grad()
    def merge(self) -> None:
        """Add s·ΔW to the base weight (checked finite first); the adapter path is then skipped.

        Not bit-reversible: `unmerge` subtracts s·ΔW again, which restores the weight up to one rounding of
        W + s·ΔW (the base check accepts such a restored base, see `lorakit.fingerprint`).
        """
        if self.merged:
            raise ConfigError(f"{self.name} is already merged; call lorakit.unmerge(model) before merging again")
        weight = self.base_layer.weight
        merged = weight.to(self.factor_dtype) + self._layout(self.total_delta_linear())
        if not torch.isfinite(merged).all():
            raise ValueError(f"{self.name}: merging would produce non-finite weights; the model was left unmerged")
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ConfigError(f"{self.name} is not merged; nothing to unmerge")
        weight = self.base_layer.weight
        weight.copy_((weight.to(self.factor_dtype) - self._layout(self.total_delta_linear())).to(weight.dtype))
        self.merged = False

    @torch.no_grad()
    def restore_base(self) -> nn.Module:
        """Return the base layer holding its original weight: bit-exact unless the adapter was merged (then
        unmerged here, exact up to one rounding)."""
        if self.merged:
            self.unmerge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"method={self.method}, in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


class SharedParameters(nn.Module):
    """Tensors shared by many adapter layers (one owner, many readers), like tied weights in transformers.

    `lorakit.adapt` registers the owner once on the model as `model.lorakit_shared`, so `model.parameters()`,
    `.to()`, DDP and FSDP see each tensor once; each layer holds a plain reference (`layer.shared`). A method that
    needs one subclasses this, declares `trainable` / `stored` like a layer, and returns it from `build_shared`.
    Files store its `stored` tensors once, under `lorakit_shared.<name>`.
    """

    trainable: ClassVar[tuple[str, ...]] = ()
    stored: ClassVar[tuple[str, ...]] = ()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self.trainable}

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.stored}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in self.stored:
                getattr(self, name).copy_(tensors[name])
