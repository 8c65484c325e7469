"""`AdapterLayer`: the one shared wrapper around a frozen linear layer.

    y = base_layer(x) + s * B (A x)          (A: r x in, B: out x r, s = alpha / r)

A method (one file in `lorakit/methods/`) subclasses it and supplies only what differs:

- `build()`: create its parameters and buffers (and regenerate frozen random ones from the seed),
- `initialize()`: draw the trained factors that start random (OLoRA: factor the weight and mutate the base),
- `factors()`: the effective (A, B) of its update ΔW = B A, on which forward / merge / delta_weight are built,
- `trainable`: the names of its trained parameters, `stored`: the tensors a file must keep.

Forward, merge, unmerge, disable and unload live here, once. Both nn.Linear (weight out x in) and transformers'
Conv1D (GPT-2, weight in x out) are handled by reading the weight in the nn.Linear layout.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .config import AdapterConfig
from .errors import ConfigError

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


FINGERPRINT_SAMPLES = 1 << 16


def weight_fingerprint(weight: torch.Tensor) -> str:
    """Fingerprint of a weight: sha256 over its dtype, shape, the wrap-around 64-bit sum of ALL its raw bytes read as
    64-bit words, and the raw bytes of 65,536 evenly strided elements.

    Any change to any element changes the sum (barring an exact cancellation), any change to a sampled element
    changes the hash, and it costs one memory-bound integer pass instead of hashing every byte (~10 ms instead of
    0.3 s on SmolLM2-135M). Deterministic across thread counts: modular integer addition is associative.
    """
    flat = weight.detach().reshape(-1)
    raw = flat.view(torch.uint8)
    words = raw.view(torch.int64) if raw.numel() % 8 == 0 else raw.to(torch.int64)
    if words.device.type == "cpu":  # numpy's unsigned sum wraps around by definition
        total = int(words.numpy().view(np.uint64).sum(dtype=np.uint64))
    else:
        total = int(words.sum()) % (1 << 64)
    stride = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    sample = flat[::stride][:FINGERPRINT_SAMPLES].to("cpu").contiguous()
    digest = hashlib.sha256(f"{weight.dtype}:{tuple(weight.shape)}:{total}:".encode())
    digest.update(memoryview(sample.view(torch.uint8).numpy()))
    return digest.hexdigest()


class AdapterLayer(nn.Module):
    """Base class of every adapted layer; see the module docstring for the contract a method fulfils."""

    method: ClassVar[str] = ""
    trainable: ClassVar[tuple[str, ...]] = ()
    stored: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str, *, initialize: bool = True):
        super().__init__()
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
        self._fingerprint: str | None = None
        self.base_mutated = False  # set by methods that change the base weight at init (OLoRA)
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

    def build(self) -> None:
        """Create parameters and buffers (zeros for what `initialize` or a file fills in)."""
        raise NotImplementedError

    def initialize(self) -> None:
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective (A, B), A: r x in, B: out x r, with ΔW = B A (unscaled, nn.Linear layout)."""
        raise NotImplementedError

    def initial_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Factors whose scaled product was subtracted from the base weight at init (OLoRA), else None."""
        return None

    def after_load(self) -> None:
        """Called after stored tensors were loaded from a file (OLoRA re-applies its base mutation here)."""

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
        with torch.no_grad():
            for name in self.stored:
                getattr(self, name).copy_(tensors[name])
        self.after_load()

    def base_weight_linear(self) -> torch.Tensor:
        """The base weight in nn.Linear layout (out x in), as a view."""
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    @property
    def base_fingerprint(self) -> str:
        """Hash of the ORIGINAL base weight; computed before any mutation (see `remember_fingerprint`)."""
        if self._fingerprint is None:
            self.remember_fingerprint()
        return self._fingerprint

    def remember_fingerprint(self) -> None:
        if self._fingerprint is None:
            if self.merged or self.base_mutated:
                raise RuntimeError(f"{self.name}: fingerprint requested after the base weight was mutated")
            self._fingerprint = weight_fingerprint(self.base_layer.weight)

    def plain_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a plain LoRA with ΔW = B A relative to the ORIGINAL base weight (same scale s).

        Methods that mutate the base at init (OLoRA) give ΔW = B A − B0 A0 = [B | −B0] [A ; A0], rank 2r.
        """
        a, b = (t.detach() for t in self.factors())
        initial = self.initial_factors()
        if initial is None:
            return a, b
        a0, b0 = initial
        return torch.cat([a, a0]), torch.cat([b, -b0], dim=1)

    def delta_weight(self) -> torch.Tensor:
        """s * ΔW in the layout and dtype of `base_layer.weight` (computed in the factors' precision)."""
        return self._layout(self._scaled_product(*self.factors())).to(self.base_layer.weight.dtype)

    def _scaled_product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b * self.scale) @ a

    def _layout(self, delta_linear: torch.Tensor) -> torch.Tensor:
        return delta_linear.T if self.fan_in_fan_out else delta_linear

    def _low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """s * B A x for x of any leading shape, in the factors' precision."""
        h = x if x.dtype == a.dtype else x.to(a.dtype)
        return (h @ a.T) @ (b.T * self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        if self.disabled:
            initial = self.initial_factors()
            if initial is None:
                return out
            return out + self._low_rank(x, *initial).to(out.dtype)
        h = self.dropout(x) if self.dropout is not None else x
        a, b = self.factors()
        if h.dtype != a.dtype:
            h = h.to(a.dtype)
        low = h @ a.T
        if out.dtype == b.dtype and out.is_contiguous():
            # one GEMM computes base + s·B·(A x): no separate update tensor and add. Out of place on purpose: an
            # in-place addmm_ into a view of `out` makes autograd copy the whole gradient (CopySlices), ~10% slower.
            fused = torch.addmm(out.view(-1, out.shape[-1]), low.view(-1, low.shape[-1]), b.T, alpha=self.scale)
            return fused.view(out.shape)
        return out + (low @ (b.T * self.scale)).to(out.dtype)

    # ----------------------------------------------------------------- merge / unmerge / restore
    @torch.no_grad()
    def merge(self) -> None:
        """Add s·ΔW to the base weight (checked finite first); the adapter path is then skipped."""
        if self.merged:
            raise ConfigError(f"{self.name} is already merged; call lorakit.unmerge(model) before merging again")
        if not self.base_mutated:
            self.remember_fingerprint()
        weight = self.base_layer.weight
        merged = weight.to(self.factor_dtype) + self._layout(self._scaled_product(*self.factors()))
        if not torch.isfinite(merged).all():
            raise ValueError(f"{self.name}: merging would produce non-finite weights; the model was left unmerged")
        weight.copy_(merged.to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ConfigError(f"{self.name} is not merged; nothing to unmerge")
        weight = self.base_layer.weight
        weight.copy_(
            (weight.to(self.factor_dtype) - self._layout(self._scaled_product(*self.factors()))).to(weight.dtype)
        )
        self.merged = False

    @torch.no_grad()
    def restore_base(self) -> nn.Module:
        """Undo merge and any init-time mutation; return the base layer holding its original weight."""
        if self.merged:
            self.unmerge()
        initial = self.initial_factors()
        if initial is not None:
            weight = self.base_layer.weight
            weight.copy_((weight.to(self.factor_dtype) + self._layout(self._scaled_product(*initial))).to(weight.dtype))
        return self.base_layer

    def extra_repr(self) -> str:
        return f"method={self.method}, in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"
