"""`AdapterLayer`: one adapter of a frozen linear layer, the base class of every method.

    y = base_layer(x) + s * B (A x)          (A: r x in, B: out x r, s = alpha / r)

The model holds, in place of each adapted module, an `lorakit.adapted.AdaptedLayer`: it owns the base layer and any
number of named adapters (instances of this class), and routes rows to them. An adapter reads the base through a
plain reference (`base_layer`, `frozen`), never owning it. A method (one file in `lorakit/methods/`) subclasses
this and supplies only what differs:

- `build()`: create its parameters and buffers (and regenerate frozen random ones from the seed),
- `initialize()`: draw the trained factors that start random (OLoRA: factor the weight),
- `factors()`: the effective (A, B) of its update ΔW = B A, on which forward / merge / delta_weight are built;
  a method whose update is not such a product overrides `add_update` (forward) and `delta_linear` (merge),
- `trainable`: the names of its trained parameters, `stored`: the tensors a file must keep.

Forward, merge, unmerge, disable and unload live here and in `AdaptedLayer`, once. No method changes the base weight outside `merge`,
so `disabled()` and `unload()` give the original weights bit for bit. Both nn.Linear (weight out x in) and transformers'
Conv1D (GPT-2, weight in x out) are handled by reading the weight in the nn.Linear layout.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .base_layers import frozen_base
from .config import AdapterConfig
from .errors import ConfigError
from .fingerprint import Fingerprint, frozen_fingerprint
from .options import Option


def base_of(module: nn.Module) -> nn.Module:
    """The base layer of an adapted module (`lorakit.adapted.AdaptedLayer`), else the module itself."""
    return module.base_layer if getattr(module, "lorakit_host", False) else module


def is_supported_layer(module: nn.Module) -> bool:
    """Whether an adapter can wrap this module: a dense or quantized linear layer (see `lorakit.base_layers`)."""
    return frozen_base(module) is not None


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported layer, or of an adapted one's base."""
    base = frozen_base(base_of(module))
    return base.in_features, base.out_features


def frozen_output(frozen, weight_noise, x: torch.Tensor) -> torch.Tensor:
    """A frozen base's output for x; under Flat-LoRA's `weight_noise`, that of a temporary W + ε."""
    if weight_noise is None:
        return frozen.output(x)
    return torch.nn.functional.linear(x, weight_noise.perturbed(frozen.dense_weight()), frozen.bias)


class AdapterLayer(nn.Module):
    """Base class of every adapted layer; see the module docstring for the contract a method fulfils."""

    method: ClassVar[str] = ""
    trainable: ClassVar[tuple[str, ...]] = ()
    stored: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, Option]] = {}  # the method's keys in AdapterConfig.extra
    # why AdapterConfig.init does not apply (the warning's reason), or None where the method reads it
    init_ignored: ClassVar[str | None] = None
    recomputed_part: ClassVar[str] = "the update"  # what `recomputed_factors` gives, in words
    # whether `rederive` reads the frozen links (OLoRA, LoRA-XS): then a file alone cannot rebuild a later link's
    # frozen factors, and the procedure that owns the links keeps their sketch (`lorakit.procedures.cola`)
    derives_from_links: ClassVar[bool] = False

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
        frozen = frozen_base(base_layer)
        if frozen is None:
            raise ConfigError(
                f"{name} is a {type(base_layer).__name__}, which lorakit cannot adapt; target linear layers "
                "(nn.Linear, Conv1D, bitsandbytes 4-bit / 8-bit, torchao NF4)"
            )
        object.__setattr__(self, "frozen", frozen)  # plain references: the `AdaptedLayer` host owns the base layer
        object.__setattr__(self, "base_layer", base_layer)
        object.__setattr__(self, "host", None)  # set by `AdaptedLayer.add`
        self.adapter_name = "default"
        self.base_fingerprint = fingerprint or frozen_fingerprint(frozen)
        self.name = name
        self.config = config
        self.fan_in_fan_out = frozen.transposed
        self.in_features, self.out_features = frozen.in_features, frozen.out_features
        self.r = config.r
        self.scale = config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.merged = False
        self._disabled = False
        self._weight_noise = None
        # Chain of LoRA's finished links, frozen: (A, s·B) of rank Σ r_j, added to the update (plain tensors, not
        # buffers: a procedure owns and saves them)
        self.frozen_links: tuple[torch.Tensor, torch.Tensor] | None = None
        # Trained factors live in float32 under half-precision bases (their updates are too small for fp16/bf16).
        self.factor_dtype = torch.float32 if frozen.dtype in (torch.float16, torch.bfloat16) else frozen.dtype
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
    def useful_rank(cls, config: AdapterConfig, in_features: int, out_features: int) -> tuple[int, str] | None:
        """(the largest r that adds rank to this layer's update, the bound in words), or None where the method
        cannot say (a larger r may still reach more updates). `adapt` warns when r exceeds it."""
        return None

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
        return nn.Parameter(tensor.to(device=self.frozen.device, dtype=self.factor_dtype))

    def new_buffer(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor.to(device=self.frozen.device, dtype=self.factor_dtype))

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
        """The base weight in nn.Linear layout (out x in): a view of a dense weight, a temporary dequantized copy of
        a quantized one."""
        return self.frozen.dense_weight()

    def init_weight_linear(self) -> torch.Tensor:
        """The weight a data-dependent init reads (OLoRA's QR, LoRA-XS's SVD), nn.Linear layout: the base weight plus
        the frozen links, i.e. the merged W + ΣΔW from which Chain of LoRA and XGBLoRA start each new link (computed,
        never written into the base)."""
        weight = self.base_weight_linear()
        if self.frozen_links is None:
            return weight
        a, b = self.frozen_links
        return weight.to(self.factor_dtype) + b @ a

    def rederive(self) -> None:
        """Recompute the frozen tensors a method derives from `init_weight_linear()` and does not store (OLoRA's
        A0, B0, LoRA-XS's SVD), keeping the trained ones; a procedure calls it when `frozen_links` change."""

    def delta_weight(self) -> torch.Tensor:
        """s * ΔW in the layout and dtype of the base weight (computed in the factors' precision)."""
        return self._layout(self.delta_linear()).to(self.frozen.dtype)

    def _scaled_product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b * self.scale) @ a

    def _layout(self, delta_linear: torch.Tensor) -> torch.Tensor:
        return delta_linear.T if self.fan_in_fan_out else delta_linear

    def _add_low_rank(
        self, out: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float | None = None
    ) -> torch.Tensor:
        """out + scale·B·A·h in the factors' precision (scale defaults to s)."""
        scale = self.scale if scale is None else scale
        if h.dtype != a.dtype and not torch.is_autocast_enabled(h.device.type):
            low = UpcastProjection.apply(h, a)  # keeps h in its own dtype for backward, not a float32 copy
        else:
            low = h.to(a.dtype) @ a.T
        if out.dtype == b.dtype and out.is_contiguous():
            # one GEMM computes base + s·B·(A x): no separate update tensor and add. Out of place on purpose: an
            # in-place addmm_ into a view of `out` makes autograd copy the whole gradient (CopySlices), ~10% slower.
            fused = torch.addmm(out.view(-1, out.shape[-1]), low.view(-1, low.shape[-1]), b.T, alpha=scale)
            return fused.view(out.shape)
        return out + (low @ (b.T * scale)).to(out.dtype)

    # the base's state, kept by the host (several adapters share one base): a disabled host computes the base,
    # and Flat-LoRA's ε (`weight_noise`, has .perturbed(W) -> W + ε) perturbs the base under every adapter
    @property
    def disabled(self) -> bool:
        return self.host.disabled if self.host is not None else self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        if self.host is not None:
            self.host.disabled = value
        else:
            self._disabled = value

    @property
    def weight_noise(self):
        return self.host.weight_noise if self.host is not None else self._weight_noise

    @weight_noise.setter
    def weight_noise(self, value) -> None:
        if self.host is not None:
            self.host.weight_noise = value
        else:
            self._weight_noise = value

    def base_output(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer's output; with `weight_noise` set, that of W + ε, computed from a temporary W + ε so
        that the stored weight is never written (see `lorakit.procedures.flat`)."""
        return frozen_output(self.frozen, self.weight_noise, x)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out + this adapter's update; `out` defaults to the base output (the host passes the running sum when
        several adapters are active)."""
        if out is None:
            out = self.base_output(x)
        if self.merged or self.disabled:
            return out
        if self.frozen_links is not None:
            out = self._add_low_rank(out, x, *self.frozen_links, scale=1.0)
        return self.add_update(out, x)

    def route_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) with B·A = s·ΔW plus any frozen links, relative to the original base, in the factors' dtype: what
        a mixed batch multiplies each row by (`lorakit.routing`). None where the update is not low rank."""
        factors = self.export_factors()
        if factors is None:
            return None
        a, b = (t.to(self.factor_dtype) for t in factors)
        b = b * self.scale
        if self.frozen_links is not None:
            link_a, link_b = self.frozen_links
            a, b = torch.cat([a, link_a.to(a.dtype)]), torch.cat([b, link_b.to(b.dtype)], dim=1)
        return a, b

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
        if not self.frozen.can_merge:
            raise ConfigError(
                f"{self.name} has a {self.frozen.quantization} quantized base, which lorakit does not merge into in "
                "place (that would re-quantize it); run `lorakit merge` to write a full-precision merged model"
            )
        weight = self.base_layer.weight
        merged = weight.to(self.factor_dtype) + self._layout(self.total_delta_linear())
        if not torch.isfinite(merged).all():
            raise ValueError(f"{self.name}: merging would produce non-finite weights; the model was left unmerged")
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def dense_merged(self) -> nn.Linear:
        """A new full-precision nn.Linear computing this adapted layer: dequantized W + s·ΔW (+ frozen links),
        in the base's compute dtype. For a quantized base, whose stored weight lorakit never re-quantizes."""
        weight = self.frozen.dense_weight().to(self.factor_dtype) + self.total_delta_linear()
        if not torch.isfinite(weight).all():
            raise ValueError(f"{self.name}: merging would produce non-finite weights; the model was left unmerged")
        bias = self.frozen.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                           dtype=self.frozen.dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        linear.requires_grad_(False)
        return linear

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


class UpcastProjection(torch.autograd.Function):
    """A·h in A's precision (float32 factors under a bf16 / fp16 base), saving h in ITS dtype for backward.

    Autograd of `h.float() @ A.T` saves the float32 copy of h for A's gradient: twice the bytes of the bf16
    activation, per adapted layer, alive until backward. Upcasting again in backward is exact, so this computes
    the same values and gradients with half of that memory."""

    @staticmethod
    def forward(ctx, h, a):
        ctx.save_for_backward(h, a)
        return h.to(a.dtype) @ a.T

    @staticmethod
    def backward(ctx, grad):
        h, a = ctx.saved_tensors
        grad_h = (grad @ a).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_a = grad.reshape(-1, grad.shape[-1]).T @ h.reshape(-1, h.shape[-1]).to(a.dtype)
        return grad_h, grad_a


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
