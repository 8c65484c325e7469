"""The frozen layer under an adapter, read through one small protocol whatever stores its weight.

An adapter needs four things of the layer it wraps, and nothing else:

- `output(x)`: the frozen layer's own output for x (any leading shape);
- `dense_weight()`: its weight as a dense out x in matrix (nn.Linear layout), dequantized if stored quantized:
  what OLoRA's QR, LoRA-XS's SVD, LoRA-Mini `qr`, Flat-LoRA's W + ε and the base check read;
- `can_merge`: whether s·ΔW can be added to the stored weight in place (a 4-bit or 8-bit weight cannot without
  re-quantizing, which lorakit never does silently);
- `quantization`: None, or the storage format ("nf4", "fp4", "int8", "torchao-nf4"), which names the dtype of
  the base fingerprint and the tolerance the base check uses (`lorakit.fingerprint`).

One class per storage backend, each recognised by what its weight can do (a bitsandbytes `Params4bit` carries a
`quant_state`, an `Int8Params` its row scales `SCB`, a torchao `NF4Tensor` its `get_original_weight`), not by an
exact list of layer types that breaks at the next release. Every method runs unchanged on top of any of them
(torchtune's QLoRA has the same split: a frozen NF4 linear under an unchanged LoRA layer).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

try:  # transformers is a dependency, but keep the layer importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


class FrozenBase:
    """A frozen linear layer as an adapter reads it (see the module docstring). Holds the module, not a copy."""

    quantization: ClassVar[str | None] = None
    can_merge: ClassVar[bool] = True
    transposed: ClassVar[bool] = False  # weight stored in x out (transformers' Conv1D)

    def __init__(self, module: nn.Module):
        self.module = module

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    # ---------------------------------------------------------------- shape, place, precision
    @property
    def in_features(self) -> int:
        return int(self.module.in_features)

    @property
    def out_features(self) -> int:
        return int(self.module.out_features)

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the layer computes in (and in which `dense_weight` is returned)."""
        return self.module.weight.dtype

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    def bytes_per_parameter(self) -> float:
        """Bytes the stored weight takes per weight element (quantization statistics included)."""
        weight = self.module.weight
        return weight.numel() * weight.element_size() / (self.in_features * self.out_features)

    # ---------------------------------------------------------------- the two views of the layer
    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint_weight(self) -> torch.Tensor:
        """The weight the base check fingerprints: the dequantized weight in the precision it was quantized from."""
        return self.dense_weight()

    def quantization_settings(self) -> dict | None:
        """What `lorakit.quantize.quantized_copy` needs to quantize a full-precision weight the same way, or None."""
        return None


class DenseLinear(FrozenBase):
    """nn.Linear (and subclasses that keep its forward) with a floating weight, out x in."""

    @classmethod
    def matches(cls, module):
        return (
            isinstance(module, nn.Linear)
            and type(module).forward is nn.Linear.forward
            # nn.MultiheadAttention reads its out_proj's weight directly and never calls its forward
            and type(module).__name__ != "NonDynamicallyQuantizableLinear"
            and _is_plain_float(module.weight)
        )

    def dense_weight(self):
        return self.module.weight


class TransposedConv1D(FrozenBase):
    """transformers' Conv1D (GPT-2): y = x·W + b with W stored in x out."""

    transposed = True

    @classmethod
    def matches(cls, module):
        return Conv1D is not None and isinstance(module, Conv1D) and _is_plain_float(module.weight)

    @property
    def in_features(self):
        return int(self.module.weight.shape[0])

    @property
    def out_features(self):
        return int(self.module.weight.shape[1])

    def dense_weight(self):
        return self.module.weight.T


class DequantizingLinear(torch.autograd.Function):
    """y = x·Ŵᵀ + b with Ŵ the dequantized frozen weight, made again in backward instead of kept: autograd saves
    nothing of this product but a reference to the 4-bit layer (the input's gradient needs only Ŵ)."""

    @staticmethod
    def forward(ctx, x, frozen, bias):
        ctx.frozen, ctx.input_dtype = frozen, x.dtype
        weight = frozen.dense_weight()
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        weight = ctx.frozen.dense_weight()
        return (grad_output.to(weight.dtype) @ weight).to(ctx.input_dtype), None, None


class Bitsandbytes4bit(FrozenBase):
    """bitsandbytes `Linear4bit` (nf4 or fp4, with or without double quantization), as transformers creates it
    with `BitsAndBytesConfig(load_in_4bit=True)`.

    Its output is computed here, not by the layer: dequantize, then one GEMM in the compute dtype (what
    bitsandbytes' training path does), through `DequantizingLinear`, which keeps no dequantized weight for backward.
    The layer's own forward is not called because on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks the weight
    at the first forward in eval mode without gradients (absmax rounded to bf16, a bf16 kernel): the same layer
    then gives other outputs in eval than in training (5e-3 on the test model's logits). Here it is one
    computation in both modes, equal to the layer's training-mode output (tested against PEFT)."""

    can_merge = False

    @classmethod
    def matches(cls, module):
        return isinstance(module, nn.Linear) and getattr(module.weight, "quant_state", None) is not None

    @property
    def quantization(self):
        return str(self.module.weight.quant_state.quant_type)

    @property
    def dtype(self):
        compute = getattr(self.module, "compute_dtype", None)
        return compute if compute is not None else self.module.weight.quant_state.dtype

    def bytes_per_parameter(self):
        state = self.module.weight.quant_state
        packed = self.module.weight.numel() * self.module.weight.element_size()
        absmax = state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            absmax += state.state2.absmax.numel() * state.state2.absmax.element_size()
        return (packed + absmax) / (self.in_features * self.out_features)

    def quantization_settings(self):
        state = self.module.weight.quant_state
        return {"scheme": self.quantization, "blocksize": int(state.blocksize), "double_quant": bool(state.nested)}

    def output(self, x):
        bias = self.module.bias
        return DequantizingLinear.apply(x, self, None if bias is None else bias.to(self.dtype))

    def fingerprint_weight(self):
        import bitsandbytes.functional as bnb_functional

        weight = self.module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):  # repacked by an eval forward (above)
            weight.data, weight.quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)

    def dense_weight(self):
        return self.fingerprint_weight().to(self.dtype)


class Bitsandbytes8bit(FrozenBase):
    """bitsandbytes `Linear8bitLt` with int8 weights (`has_fp16_weights=False`, what `load_in_8bit=True` makes):
    W = CB · SCB / 127 row by row.

    Its output is one computation in training and in eval, as the 4-bit layer's: bitsandbytes 0.50 itself switches
    computations with the mode on a CPU or XPU. There its training path (`MatMul8bitFp`) dequantizes W and runs one
    GEMM, while its eval path (`MatMul8bitLt`, LLM.int8()) also rounds each input row to int8
    through float16, outliers above `threshold` excepted; so a model trained on the first would be scored on the
    second (SmolLM2 untrained: eval loss 3.8903 against 3.9274). On those devices lorakit computes the training
    path's output in both modes, through `DequantizingLinear` (which, unlike `MatMul8bitFp`, keeps no reference to
    the input for backward). On CUDA, where bitsandbytes runs `MatMul8bitLt` in both modes, it is the layer's own."""

    quantization = "int8"
    can_merge = False
    DEQUANTIZING_DEVICES: ClassVar[tuple[str, ...]] = ("cpu", "xpu")  # bitsandbytes' `matmul` dispatch

    def quantization_settings(self):
        return {"scheme": "int8"}

    @classmethod
    def matches(cls, module):
        weight = getattr(module, "weight", None)
        return (
            isinstance(module, nn.Linear) and weight is not None and weight.dtype == torch.int8 and _row_scales(module) is not None
        )

    @property
    def dtype(self):
        bias = self.module.bias
        return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32

    def bytes_per_parameter(self):
        scales = _row_scales(self.module)
        return (self.module.weight.numel() + scales.numel() * scales.element_size()) / (
            self.in_features * self.out_features
        )

    def output(self, x):
        if x.device.type not in self.DEQUANTIZING_DEVICES:
            return self.module(x)
        bias = self.module.bias
        return DequantizingLinear.apply(x, self, None if bias is None else bias.to(self.dtype))

    def dense_weight(self):
        scales = _row_scales(self.module).to(torch.float32)
        return (self.module.weight.data.to(torch.float32) * (scales[:, None] / 127.0)).to(self.dtype)


class TorchaoNF4(FrozenBase):
    """An nn.Linear whose weight is a torchao `NF4Tensor` (torchtune's QLoRA); its forward dispatches to
    `linear_nf4`, which keeps the 4-bit weight for backward and dequantizes it again there."""

    quantization = "torchao-nf4"
    can_merge = False

    @classmethod
    def matches(cls, module):
        return isinstance(module, nn.Linear) and callable(getattr(module.weight, "get_original_weight", None))

    @property
    def dtype(self):
        return self.module.weight.dtype

    def bytes_per_parameter(self):
        weight = self.module.weight
        parts = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
        total = sum(t.numel() * t.element_size() for t in (getattr(weight, p, None) for p in parts) if t is not None)
        return total / (self.in_features * self.out_features)

    def quantization_settings(self):
        weight = self.module.weight
        return {"scheme": self.quantization, "block_size": int(weight.block_size),
                "scaler_block_size": int(weight.scaler_block_size)}

    def dense_weight(self):
        return self.module.weight.get_original_weight()


# Quantized backends first: a bitsandbytes or torchao layer is also an nn.Linear.
BACKENDS: tuple[type[FrozenBase], ...] = (Bitsandbytes4bit, Bitsandbytes8bit, TorchaoNF4, DenseLinear, TransposedConv1D)


def _is_plain_float(weight) -> bool:
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point() and not callable(
        getattr(weight, "get_original_weight", None)
    )


def _row_scales(module: nn.Module) -> torch.Tensor | None:
    scales = getattr(module.weight, "SCB", None)
    if scales is None:
        state = getattr(module, "state", None)
        scales = getattr(state, "SCB", None)
    return scales


def frozen_base(module: nn.Module) -> FrozenBase | None:
    """The protocol object for `module`, or None if no backend can adapt it (an adapted module,
    `lorakit.adapted.AdaptedLayer`, is not itself a base: see `lorakit.layer.base_of`)."""
    for backend in BACKENDS:
        if backend.matches(module):
            return backend(module)
    return None
