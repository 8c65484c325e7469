"""Adapter files: `DIR/adapter.safetensors` (tensors) + `DIR/adapter.json` (everything else).

Only what cannot be regenerated is stored (each method's `stored` tensors): LoRA A, B; OLoRA A, B, A0, B0;
LoRA-Mini A_in, B_in (outer matrices come back from the seed, or from the base weight for mini_outer="qr").
adapter.json records the config, the format version, per-module shapes and the sha256 of each adapted module's
ORIGINAL base weight, and the sha256 of the tensor file, so a truncated, corrupt or mismatched pair is refused.
Nothing is ever unpickled. Every check runs before the base model is touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from . import __version__
from .atomic import prepare_directory, write_bytes, write_json
from .config import AdapterConfig
from .errors import AdapterFileError, BaseModelMismatchError, ConfigError
from .inject import _require_adapted, adapter_layers, build_layers, install
from .layer import is_supported_layer, linear_shape, weight_fingerprint
from .methods import METHODS

FORMAT = "lorakit-adapter"
FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
MAX_MODULES = 100_000
MAX_DIM = 1 << 24


def save_adapter(model: nn.Module, directory) -> Path:
    """Write the model's adapter to `directory` atomically; returns the directory."""
    layers = _require_adapted(model)
    config = layers[0][1].config
    tensors, modules = {}, {}
    for name, layer in layers:
        stored = {key: value.detach().to("cpu").contiguous() for key, value in layer.stored_tensors().items()}
        tensors.update({f"{name}.{key}": value for key, value in stored.items()})
        modules[name] = {
            "in": layer.in_features,
            "out": layer.out_features,
            "fan_in_fan_out": layer.fan_in_fan_out,
            "base_dtype": str(layer.base_layer.weight.dtype).removeprefix("torch."),
            "base_fingerprint": layer.base_fingerprint,
            "tensors": {key: list(value.shape) for key, value in stored.items()},
        }
    blob = save_safetensors(tensors, metadata={"format": FORMAT})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lorakit_version": __version__,
        "method": config.method,
        "config": config.to_dict(),
        "base_model": _describe_base(model),
        "trainable_parameters": sum(p.numel() for _, l in layers for p in l.trainable_parameters().values()),
        "tensors_file": TENSORS_FILE,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "modules": modules,
    }
    out = prepare_directory(directory)
    write_bytes(out / TENSORS_FILE, blob)
    write_json(out / CONFIG_FILE, metadata)  # written last: it vouches for the tensor file by hash
    return out


def _describe_base(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "model_type": getattr(config, "model_type", None),
    }


def read_adapter(directory) -> tuple[dict, AdapterConfig, dict[str, torch.Tensor]]:
    """Read and validate an adapter directory without touching any model: (metadata, config, tensors)."""
    path = Path(directory)
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {path} not found; pass the --out directory of a lorakit run")
    meta_path = path / CONFIG_FILE
    if not meta_path.is_file():
        raise AdapterFileError(f"{meta_path} is missing; {path} is not a lorakit adapter directory")
    metadata = read_json(meta_path, "the file is corrupt, save it again")
    config = validate_metadata(metadata, meta_path)
    tensor_path = path / metadata["tensors_file"]
    if not tensor_path.is_file():
        raise AdapterFileError(f"{tensor_path} is missing; the adapter at {path} is incomplete, save it again")
    blob = tensor_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != metadata["tensors_sha256"]:
        raise AdapterFileError(
            f"{tensor_path} does not match {CONFIG_FILE} (truncated, corrupt or from an interrupted save); "
            "save the adapter again"
        )
    try:
        tensors = load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{tensor_path} is not a valid safetensors file ({exc}); save it again") from None
    _check_tensor_shapes(metadata, tensors, tensor_path)
    return metadata, config, tensors


def read_json(path: Path, fix: str):
    """Parse a JSON file; a one-line AdapterFileError naming the file, the problem and `fix` otherwise."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); {fix}") from None


def validate_metadata(metadata, where) -> AdapterConfig:
    """Check types and ranges of adapter.json before anything is allocated from it."""

    def fail(problem: str):
        raise AdapterFileError(f"{where}: {problem}; the file is not a valid lorakit adapter, save it again")

    if not isinstance(metadata, dict):
        fail("top level is not a JSON object")
    if metadata.get("format") != FORMAT:
        fail(f"'format' is {metadata.get('format')!r}, expected {FORMAT!r}")
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        fail("'format_version' is missing or not a positive integer")
    if version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{where}: format version {version} was written by a newer lorakit ({metadata.get('lorakit_version')}); "
            f"this lorakit {__version__} reads up to version {FORMAT_VERSION}: upgrade lorakit"
        )
    for key, kind in (("method", str), ("config", dict), ("modules", dict), ("tensors_sha256", str)):
        if not isinstance(metadata.get(key), kind):
            fail(f"field {key!r} is missing or not a {kind.__name__}")
    if metadata.get("tensors_file", TENSORS_FILE) != TENSORS_FILE:
        fail(f"'tensors_file' must be {TENSORS_FILE!r}")
    metadata["tensors_file"] = TENSORS_FILE
    if metadata["method"] not in METHODS:
        raise AdapterFileError(f"{where}: method {metadata['method']!r} is unknown to lorakit {__version__}; upgrade")
    try:
        config = AdapterConfig.from_dict(metadata["config"])
    except (ConfigError, TypeError) as exc:
        fail(f"invalid config ({exc})")
    if config.method != metadata["method"]:
        fail("'method' and config.method differ")
    modules = metadata["modules"]
    if not modules or len(modules) > MAX_MODULES:
        fail(f"'modules' must list 1 to {MAX_MODULES} modules")
    for name, info in modules.items():
        _validate_module(name, info, fail)
    return config


def _validate_module(name, info, fail) -> None:
    if not isinstance(info, dict):
        fail(f"module {name!r} entry is not an object")
    for key in ("in", "out"):
        value = info.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_DIM:
            fail(f"module {name!r} field {key!r} must be an integer in 1..{MAX_DIM}")
    if not isinstance(info.get("base_fingerprint"), str) or not isinstance(info.get("tensors"), dict):
        fail(f"module {name!r} lacks 'base_fingerprint' or 'tensors'")
    for key, shape in info["tensors"].items():
        if not (isinstance(shape, list) and all(isinstance(d, int) and 0 < d <= MAX_DIM for d in shape)):
            fail(f"module {name!r} tensor {key!r} has an invalid shape")


def _check_tensor_shapes(metadata: dict, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = {
        f"{name}.{key}": tuple(shape)
        for name, info in metadata["modules"].items()
        for key, shape in info["tensors"].items()
    }
    if set(expected) != set(tensors):
        missing = sorted(set(expected) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(expected))[:3]
        raise AdapterFileError(f"{where}: tensors do not match {CONFIG_FILE} (missing {missing}, unexpected {extra})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
            raise AdapterFileError(f"{where}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")


def check_base(model: nn.Module, metadata: dict, config: AdapterConfig, *, strict: bool = True) -> dict[str, str]:
    """Compare the base model with the adapter's fingerprint; returns {module: actual weight fingerprint}."""
    named = dict(model.named_modules())
    hashes = {}
    for name, info in metadata["modules"].items():
        module = named.get(name)
        if module is None or not is_supported_layer(module):
            raise BaseModelMismatchError(
                f"base model has no linear module {name!r} that the adapter needs; load the adapter onto the "
                f"base model it was trained on ({metadata.get('base_model', {}).get('name_or_path') or 'see adapter.json'})"
            )
        shape = linear_shape(module)
        if shape != (info["in"], info["out"]):
            raise BaseModelMismatchError(
                f"base module {name} is {shape[0]} -> {shape[1]} but the adapter expects {info['in']} -> {info['out']}; "
                "load the adapter onto the base model it was trained on"
            )
        actual = weight_fingerprint(module.weight)
        hashes[name] = actual
        if actual != info["base_fingerprint"]:
            message = (
                f"base module {name} has different weights than the adapter was trained on; "
                "load it onto the same base model, or pass strict=False (CLI: --no-strict) to apply it anyway"
            )
            if strict or (config.method == "mini" and config.mini_outer == "qr"):
                if not strict:
                    message = (
                        f"base module {name} differs and mini_outer='qr' adapters derive from the exact base weight"
                    )
                raise BaseModelMismatchError(message)
            warnings.warn(message, stacklevel=3)
    return hashes


def load_adapter(model: nn.Module, directory, *, strict: bool = True) -> nn.Module:
    """Apply the adapter in `directory` to `model` (a fresh ORIGINAL base model), in place; returns the model.

    `strict=False` turns a base-weight mismatch into a warning (shapes must still match).
    """
    metadata, config, tensors = read_adapter(directory)
    if any(True for _ in adapter_layers(model)):
        raise ConfigError("the model already has adapters; load the adapter onto a fresh base model")
    hashes = check_base(model, metadata, config, strict=strict)
    layer_cls = METHODS[config.method]
    for name, info in metadata["modules"].items():
        expected = layer_cls.stored_shapes(config, info["in"], info["out"])
        if {key: tuple(shape) for key, shape in info["tensors"].items()} != expected:
            raise AdapterFileError(
                f"{directory}: module {name} tensors do not fit the config {expected}; save it again"
            )
    exact = dataclasses.replace(config, targets=list(metadata["modules"]), exclude=None)
    try:
        layers = build_layers(model, exact, initialize=False)
    except ConfigError as exc:
        raise AdapterFileError(f"adapter at {directory} cannot be applied: {exc}") from None
    install(model, layers)
    for name, layer in layers.items():
        layer.config = config
        layer._fingerprint = hashes[name]
        layer.load_tensors({key: tensors[f"{name}.{key}"] for key in layer.stored})
    return model
