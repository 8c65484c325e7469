"""Quantize a loaded base model's linear layers: `lorakit train --quantize {nf4,fp4,int8,torchao-nf4}`.

transformers quantizes while loading (`BitsAndBytesConfig(load_in_4bit=True)`); lorakit also loads GGUF files and
built-in models that arrive in full precision, so it quantizes after loading, the same way: every nn.Linear
except the output head becomes a bitsandbytes `Linear4bit` (blocksize 64, double quantization of the absmax
statistics, as QLoRA, Dettmers et al. 2023, arXiv 2305.14314) or `Linear8bitLt` (LLM.int8(), arXiv 2208.07339,
int8 weights with row scales, outlier threshold 6.0). `torchao-nf4` stores the same NF4 code (QLoRA's) as a
torchao `NF4Tensor` (`to_nf4`: blocks of 64 weights with one absmax each, the absmaxes quantized again to int8 in
blocks of up to 256, as torchtune's QLoRA); its linear dispatches to torchao's `linear_nf4`, which keeps only the
4-bit weight for backward. The embeddings, norms and head stay as they are (the head is usually tied to the
embeddings). The result is the model transformers would load with the same config, and the
adapters see it through `lorakit.base_layers`.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

SCHEMES = ("nf4", "fp4", "int8", "torchao-nf4")
INSTALL_HINT = "pip install 'lorakit[quantization]' (bitsandbytes)"
TORCHAO = "torchao-nf4"
TORCHAO_BLOCK = 64  # weights per absmax, as bitsandbytes' blocksize above (torchao's default)
TORCHAO_SCALER_BLOCK = 256  # absmaxes per int8 scale of the double quantization, at most (torchao's default)


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"--quantize needs bitsandbytes; {INSTALL_HINT}") from None
    return bitsandbytes


def quantize_model(model: nn.Module, scheme: str, *, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the model's linear layers (output head excluded) by bitsandbytes layers, or give them torchao NF4
    weights (`torchao-nf4`), in place; returns it.

    `compute_dtype` (bitsandbytes 4-bit only) is the dtype of the dequantized weight in the GEMM; default: the
    weight's dtype.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"--quantize {scheme!r} is not a quantization; use one of {', '.join(SCHEMES)}")
    backend = _torchao_nf4() if scheme == TORCHAO else _bitsandbytes()
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module is not head and _is_dense(module.weight)
    ]
    if not names:
        raise ConfigError(
            "--quantize: the model has no nn.Linear layers to quantize (bitsandbytes quantizes nn.Linear only, "
            "not GPT-2's Conv1D); train without --quantize"
        )
    if scheme == TORCHAO:  # every layer checked before any is changed
        for name in names:
            _check_torchao_shape(model.get_submodule(name).weight, name)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if scheme == TORCHAO:
            _torchao_linear(backend, getattr(parent, child))
            continue
        setattr(parent, child, _quantized_linear(backend, getattr(parent, child), scheme, compute_dtype))
    _rehome_tensors(model)
    model.lorakit_quantization = scheme  # recorded in summary.json; not a parameter or buffer
    return model


def _rehome_tensors(model: nn.Module) -> None:
    """Copy the tensors that stayed in full precision (embeddings, norms, head) into memory of their own.

    transformers maps a safetensors file into memory and its tensors are views of that mapping. Quantizing reads
    every linear weight, so the whole file stays resident while any view of it lives: on SmolLM2-135M, 0.29 GB of
    float32 weights that the 4-bit model no longer uses were still counted in the process's memory (measured with
    benchmarks/bench_memory.py's child). Copying the few remaining tensors releases the mapping."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:  # each once, a tied weight too
            if _is_dense(tensor) and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def quantized_copy(weight: torch.Tensor, settings: dict) -> torch.Tensor:
    """The dequantized weight a bitsandbytes layer with `settings` (`FrozenBase.quantization_settings`) would hold
    for this full-precision weight (out x in): how the base check recognises the base a quantized adapter came from."""
    data = weight.detach().to("cpu").contiguous()
    if settings["scheme"] == TORCHAO:
        to_nf4 = _torchao_nf4()
        return to_nf4(data, int(settings["block_size"]), int(settings["scaler_block_size"])).get_original_weight()
    _bitsandbytes()
    import bitsandbytes.functional as bnb_functional

    if settings["scheme"] == "int8":  # as Int8Params quantizes: from float16, row-wise absmax
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(data.to(torch.float16))
        return codes.to(torch.float32) * (scales.to(torch.float32)[:, None] / 127.0)
    packed, state = bnb_functional.quantize_4bit(
        data, blocksize=settings["blocksize"], compress_statistics=settings["double_quant"], quant_type=settings["scheme"]
    )
    return bnb_functional.dequantize_4bit(packed, state)


def _is_dense(tensor: torch.Tensor) -> bool:
    """A full-precision tensor (not a torchao NF4Tensor, whose dtype is the one it dequantizes to)."""
    return tensor.is_floating_point() and not callable(getattr(tensor, "get_original_weight", None))


def _torchao_nf4():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        raise ConfigError("--quantize torchao-nf4 needs torchao 0.18 or later; pip install torchao") from None
    return to_nf4


def scaler_block_size(elements: int) -> int:
    """The double quantization's block of absmaxes for a weight of `elements`: the largest divisor of its number of
    64-weight blocks up to 256 (torchao's `to_nf4` needs whole blocks; 256 for dimensions that are multiples of 128,
    216 for SmolLM2's 576 x 576)."""
    blocks = elements // TORCHAO_BLOCK
    return max(d for d in range(1, min(blocks, TORCHAO_SCALER_BLOCK) + 1) if blocks % d == 0)


def _check_torchao_shape(weight: torch.Tensor, name: str) -> None:
    if weight.numel() % TORCHAO_BLOCK:
        raise ConfigError(
            f"--quantize torchao-nf4: {name} holds {weight.numel()} weights, not a multiple of torchao's NF4 block of "
            f"{TORCHAO_BLOCK}; use --quantize nf4 (bitsandbytes) for this model"
        )


def _torchao_linear(to_nf4, linear: nn.Linear) -> None:
    """Store the layer's weight as a torchao NF4Tensor, in place (the layer stays an nn.Linear)."""
    weight = linear.weight.detach()
    quantized = to_nf4(weight.contiguous(), TORCHAO_BLOCK, scaler_block_size(weight.numel()))
    linear.weight = nn.Parameter(quantized, requires_grad=False)
    if linear.bias is not None:
        linear.bias.requires_grad_(False)


def _quantized_linear(bnb, linear: nn.Linear, scheme: str, compute_dtype) -> nn.Module:
    weight = linear.weight.detach()
    bias = linear.bias
    device = weight.device
    if scheme == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias is not None, has_fp16_weights=False, threshold=6.0
        )
        layer.weight = bnb.nn.Int8Params(weight.to("cpu").clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype or weight.dtype,
            compress_statistics=True,
            quant_type=scheme,
        )
        layer.weight = bnb.nn.Params4bit(
            weight.to("cpu").clone(), requires_grad=False, compress_statistics=True, quant_type=scheme
        )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu").clone(), requires_grad=False)
    return layer.to(device)  # bitsandbytes quantizes on the move to a device


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear layer by a full-precision nn.Linear holding its dequantized weight, in place."""
    from .base_layers import frozen_base

    for name, module in list(model.named_modules()):
        frozen = frozen_base(module)
        if frozen is None or frozen.quantization is None:
            continue
        dense = nn.Linear(frozen.in_features, frozen.out_features, bias=frozen.bias is not None,
                          device=frozen.device, dtype=frozen.dtype)
        with torch.no_grad():
            dense.weight.copy_(frozen.dense_weight())
            if frozen.bias is not None:
                dense.bias.copy_(frozen.bias)
        dense.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    if hasattr(model, "lorakit_quantization"):
        del model.lorakit_quantization
    return model


def model_quantization(model: nn.Module) -> dict:
    """{"quantization": the base's scheme (None if unquantized), "base_bytes_per_parameter": the frozen base's stored
    bytes over its parameter count, a quantized weight counted as in x out parameters (statistics included)}."""
    from .base_layers import frozen_base

    schemes, stored, count = set(), 0.0, 0
    for module in model.modules():
        frozen = frozen_base(module)
        own = [p for p in module.parameters(recurse=False) if not p.requires_grad]
        if frozen is not None and frozen.quantization is not None:
            schemes.add(frozen.quantization)
            elements = frozen.in_features * frozen.out_features
            stored += frozen.bytes_per_parameter() * elements
            count += elements
            own = [p for p in own if p is not module.weight]
        stored += sum(p.numel() * p.element_size() for p in own)
        count += sum(p.numel() for p in own)
    return {
        "quantization": ",".join(sorted(schemes)) or None,
        "base_bytes_per_parameter": round(stored / count, 4) if count else None,
    }
