"""Adapter files: `DIR/adapter.safetensors` (tensors) + `DIR/adapter.json` (everything else).

Only what cannot be regenerated is stored (each method's `stored` tensors): LoRA A, B; OLoRA A, B (its A0, B0 are
recomputed from the base; older files that hold them too are still read, with their A0, B0 as saved);
LoRA-Mini A_in, B_in (outer matrices come back from the seed, or from the base weight for mini_outer="qr").
adapter.json records the config, the format version, per-module shapes, a fingerprint of each adapted module's
ORIGINAL base weight (`lorakit.fingerprint`), and the sha256 of the tensor file, so a truncated, corrupt or
mismatched pair is refused. Nothing is ever unpickled. Every check runs before the base model is touched. Methods
that rebuild frozen factors from the base on load also record a sketch of each module's update ("update_sketch",
`lorakit.fingerprint`), against which the rebuilt update is checked.

Per-module ranks (format version 3): the top-level config holds the most common (r, alpha); a module whose rank
or alpha differs carries its own "r" and "alpha" (XGBLoRA's and IncreLoRA's adapters: every module its own rank,
no padding). Methods with tensors shared by all layers (LoRTA) have one rank.

Modules trained in full (format version 4, `lorakit.saved_modules`): the "modules_to_save" section lists each
module's tensors and fingerprints of its original; the tensors are "modules_to_save.<module>.<tensor>".
Trainable token rows (`lorakit.token_rows`): the "trainable_tokens" section holds the ids, whether the head is tied,
and a fingerprint of the rows that do not train; the k x d rows are "trainable_tokens.<module>.rows".

A save replaces both files as one: adapter.json is the commit point.

    1. the new tensors go to `.adapter.pending.safetensors` (temporary file, fsync, rename)
    2. the new adapter.json, which pins the new tensors by sha256, replaces the old one (temporary, fsync, rename)
    3. the pending file is renamed to adapter.safetensors

Before step 2 completes, adapter.json and adapter.safetensors are the previous adapter; after it, adapter.json
is the new one, and the reader takes the tensor file whose sha256 it pins (adapter.safetensors, or the pending
file until step 3). A save killed or failing at any point leaves the complete previous or the complete new
adapter (tests/test_persist_atomic.py kills a writer at every fsync and rename in turn). A save that finds a
committed but unfinished predecessor finishes its step 3 first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from . import __version__
from .atomic import prepare_directory, replace_file, write_bytes, write_json
from .base_layers import frozen_base
from .config import AdapterConfig
from .errors import APPLY_ANYWAY, AdapterFileError, BaseModelMismatchError, ConfigError
from .fingerprint import (
    DIFFERENT,
    RECOMPUTE_TOLERANCE,
    SAME_OTHER_DTYPE,
    Fingerprint,
    frozen_fingerprint,
    is_quantized,
    sketch_change,
    sketch_from_json,
    sketch_to_json,
    tolerance,
    update_sketch,
)
from .inject import (
    EXTRAS,
    SHARED,
    _require_adapted,
    adapter_names,
    adapter_parameters,
    build_layers,
    install,
    is_adapted,
    new_adapter_name,
    shared_parameters,
    targetable_modules,
)
from .layer import is_supported_layer, linear_shape
from .methods import METHODS

FORMAT = "lorakit-adapter"
# 4: modules_to_save and trainable_tokens (written only by a file that has them: the others stay version 3, which
# earlier lorakits read); 3: per-module "r" / "alpha"; 2: base fingerprints with dtype, norm and samples; 1: a digest
FORMAT_VERSION = 4
PLAIN_FORMAT_VERSION = 3
TENSORS_FILE = "adapter.safetensors"
PENDING_TENSORS_FILE = ".adapter.pending.safetensors"
CONFIG_FILE = "adapter.json"
MAX_MODULES = 100_000
MAX_DIM = 1 << 24


def save_adapter(model: nn.Module, directory, *, name: str | None = None, layers: dict | None = None) -> Path:
    """Write one adapter of the model to `directory` atomically; returns the directory.

    `name`: which adapter (default: the only one, or the one in training, or the only active one). The file is
    the same whatever the adapter's name in the model: `load_adapter(..., name=...)` names it again.
    `layers` ({module name: AdapterLayer}) saves those layers instead of the model's own (Chain of LoRA writes its
    finished links and the current one as a single LoRA this way); they must wrap the model's base layers.
    """
    own = layers is None
    if own:
        layers = _require_adapted(model, name)
        adapter = layers[0][1].adapter_name
        trainable = sum(p.numel() for p in adapter_parameters(model, adapter))
    else:
        layers = list(layers.items())
        trainable = sum(p.numel() for _, layer in layers for p in layer.trainable_parameters().values())
        trainable += sum(p.numel() for extra in EXTRAS for p in extra.trainable_parameters(model))
    config = _common_config(layers)
    tensors, modules = {}, {}
    for name, layer in layers:
        stored = {key: value.detach().to("cpu").contiguous() for key, value in layer.stored_tensors().items()}
        tensors.update({f"{name}.{key}": value for key, value in stored.items()})
        modules[name] = {
            "in": layer.in_features,
            "out": layer.out_features,
            "fan_in_fan_out": layer.fan_in_fan_out,
            "base_dtype": layer.base_fingerprint.dtype,
            "base_fingerprint": layer.base_fingerprint.to_json(),
            "tensors": {key: list(value.shape) for key, value in stored.items()},
        }
        settings = layer.frozen.quantization_settings()
        if settings is not None:  # how to quantize a full-precision base the same way (see `check_base`)
            modules[name]["base_quantization"] = settings
        if (layer.config.r, layer.config.alpha) != (config.r, config.alpha):
            modules[name].update(r=layer.config.r, alpha=layer.config.alpha)
        if layer.file_fields():
            modules[name]["fields"] = layer.file_fields()
        recomputed = layer.recomputed_factors()
        if recomputed is not None and layer.frozen_links is not None and layer.derives_from_links:
            # derived from W + a procedure's links, which this file lacks: the procedure's checkpoint state keeps
            # the sketch and checks it when it restores the links (`lorakit.procedures.cola.restore_links`)
            modules[name]["derived_from_links"] = True
        elif recomputed is not None:  # checked when the factors are rebuilt on load (`lorakit.fingerprint`)
            modules[name]["update_sketch"] = sketch_to_json(update_sketch(*recomputed, layer.scale))
    shared, shared_info = shared_parameters(model, adapter) if own else None, None
    if shared is not None:  # stored once, not per layer
        stored = {key: value.detach().to("cpu").contiguous() for key, value in shared.stored_tensors().items()}
        tensors.update({f"{SHARED}.{key}": value for key, value in stored.items()})
        shared_info = {"tensors": {key: list(value.shape) for key, value in stored.items()}}
    extras = {}  # modules_to_save, trainable_tokens: their sections of adapter.json
    first = not own or adapter == adapter_names(model)[0]  # model-wide: they go with the model's first adapter
    for extra in EXTRAS if first else ():  # also when a procedure passes its own `layers`
        extra_tensors, extras[extra.FILE_KEY] = extra.to_file(model)
        tensors.update(extra_tensors)
    extras = {key: info for key, info in extras.items() if info}
    blob = save_safetensors(tensors, metadata={"format": FORMAT})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if extras else PLAIN_FORMAT_VERSION,
        "lorakit_version": __version__,
        "method": config.method,
        "config": config.to_dict(),
        "base_model": _describe_base(model),
        "trainable_parameters": trainable,
        "tensors_file": TENSORS_FILE,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "modules": modules,
    }
    if shared_info is not None:
        metadata["shared"] = shared_info
    metadata.update(extras)
    out = prepare_directory(directory)
    _finish_interrupted_save(out)
    write_bytes(out / PENDING_TENSORS_FILE, blob)
    write_json(out / CONFIG_FILE, metadata)  # the commit point: it pins the pending tensors by hash
    replace_file(out / PENDING_TENSORS_FILE, out / TENSORS_FILE)
    return out


def _common_config(layers: list) -> AdapterConfig:
    """The config written at the top of adapter.json: that of the most common (r, alpha) (first one on ties)."""
    counts = Counter((layer.config.r, layer.config.alpha) for _, layer in layers)
    rank_alpha = counts.most_common(1)[0][0]
    return next(layer.config for _, layer in layers if (layer.config.r, layer.config.alpha) == rank_alpha)


def module_config(config: AdapterConfig, info: dict) -> AdapterConfig:
    """The config of one module of a file: the top-level one with the module's own r and alpha, if it has them."""
    if "r" not in info and "alpha" not in info:
        return config
    return dataclasses.replace(config, r=info.get("r", config.r), alpha=info.get("alpha", config.alpha))


def module_ranks(metadata: dict, config: AdapterConfig) -> dict[str, int]:
    """{module: rank} of a file's modules."""
    return {name: info.get("r", config.r) for name, info in metadata["modules"].items()}


def _finish_interrupted_save(out: Path) -> None:
    """If a previous save committed adapter.json but was stopped before renaming its tensors, finish it."""
    pending, meta_path = out / PENDING_TENSORS_FILE, out / CONFIG_FILE
    if not pending.is_file() or not meta_path.is_file():
        return
    try:
        pinned = json.loads(meta_path.read_text(encoding="utf-8")).get("tensors_sha256")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return
    if pinned == _sha256_file(pending):
        replace_file(pending, out / TENSORS_FILE)


def _sha256_file(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


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
    pending = path / PENDING_TENSORS_FILE
    if not tensor_path.is_file() and not pending.is_file():
        raise AdapterFileError(f"{tensor_path} is missing; the adapter at {path} is incomplete, save it again")
    blob = tensor_path.read_bytes() if tensor_path.is_file() else b""
    if hashlib.sha256(blob).hexdigest() != metadata["tensors_sha256"]:
        # a save committed adapter.json and was stopped before renaming its tensors into place
        blob = pending.read_bytes() if pending.is_file() else b""
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
        try:
            module_config(config, info)
        except ConfigError as exc:
            fail(f"module {name!r} has an invalid rank or alpha ({exc})")
    shared = metadata.get("shared")
    if shared is not None:
        if not isinstance(shared, dict) or not isinstance(shared.get("tensors"), dict):
            fail("'shared' must be an object with 'tensors'")
        for key, shape in shared["tensors"].items():
            if not (isinstance(shape, list) and all(isinstance(d, int) and 0 < d <= MAX_DIM for d in shape)):
                fail(f"shared tensor {key!r} has an invalid shape")
        if any("r" in info or "alpha" in info for info in modules.values()):
            fail("per-module ranks are not possible with shared tensors")
    for extra in EXTRAS:
        extra.validate(metadata.get(extra.FILE_KEY), fail)
    return config


def _validate_module(name, info, fail) -> None:
    if not isinstance(info, dict):
        fail(f"module {name!r} entry is not an object")
    for key in ("in", "out"):
        value = info.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_DIM:
            fail(f"module {name!r} field {key!r} must be an integer in 1..{MAX_DIM}")
    if not isinstance(info.get("base_fingerprint"), str | dict) or not isinstance(info.get("tensors"), dict):
        fail(f"module {name!r} lacks 'base_fingerprint' or 'tensors'")
    if isinstance(info["base_fingerprint"], dict):
        try:
            Fingerprint.from_json(info["base_fingerprint"])
        except (ValueError, TypeError) as exc:
            fail(f"module {name!r} has an invalid 'base_fingerprint' ({exc})")
    for key, shape in info["tensors"].items():
        if not (isinstance(shape, list) and all(isinstance(d, int) and 0 < d <= MAX_DIM for d in shape)):
            fail(f"module {name!r} tensor {key!r} has an invalid shape")
    if "update_sketch" in info:
        try:
            sketch_from_json(info["update_sketch"])
        except (ValueError, TypeError) as exc:
            fail(f"module {name!r} has an invalid 'update_sketch' ({exc})")
    rank, alpha = info.get("r", 1), info.get("alpha", 1.0)
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= MAX_DIM:
        fail(f"module {name!r} field 'r' must be an integer in 1..{MAX_DIM}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not (math.isfinite(alpha) and alpha > 0):
        fail(f"module {name!r} field 'alpha' must be a positive number")


def _check_tensor_shapes(metadata: dict, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = {
        f"{name}.{key}": tuple(shape)
        for name, info in metadata["modules"].items()
        for key, shape in info["tensors"].items()
    }
    for key, shape in (metadata.get("shared") or {}).get("tensors", {}).items():
        expected[f"{SHARED}.{key}"] = tuple(shape)
    for extra in EXTRAS:
        expected.update(extra.file_shapes(metadata.get(extra.FILE_KEY)))
    if set(expected) != set(tensors):
        missing = sorted(set(expected) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(expected))[:3]
        raise AdapterFileError(f"{where}: tensors do not match {CONFIG_FILE} (missing {missing}, unexpected {extra})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
            raise AdapterFileError(f"{where}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")


def check_base(
    model: nn.Module, metadata: dict, config: AdapterConfig, *, strict: bool = True
) -> dict[str, Fingerprint]:
    """Compare the base model with the adapter's fingerprints; returns {module: fingerprint of the current weight}.

    The same weights in another floating dtype give one warning; a restored base (merge + unmerge) passes; other
    weights are refused (`strict=False`: a warning). Shapes must always match.
    """
    current, other_dtype = _compare_base(model, metadata, config, strict=strict)
    if other_dtype:
        warnings.warn(_dtype_message(*other_dtype), stacklevel=3)
    return current


def _dtype_message(saved_dtype: str, now_dtype: str, largest: float = 0.0, modules: int = 1) -> str:
    if is_quantized(saved_dtype) or is_quantized(now_dtype):
        return (
            f"the adapter was trained on a {saved_dtype} base and this base is {now_dtype}: the same model, whose "
            f"weights differ by the quantization (up to {largest:.1e} relative in the checked samples of {modules} "
            "modules); outputs differ from training by that quantization error"
        )
    return (
        f"the adapter was trained on a {saved_dtype} base and this base is {now_dtype} (the same weights within "
        f"{tolerance(saved_dtype, now_dtype):.1e} relative): outputs differ from training by that rounding"
    )


def _compare_base(
    model: nn.Module, metadata: dict, config: AdapterConfig, *, strict: bool
) -> tuple[dict[str, Fingerprint], tuple | None]:
    """`check_base` without its dtype warning: (current fingerprints, (saved dtype, current dtype) or None)."""
    named = targetable_modules(model)  # an adapted model's modules stand for their bases (a second adapter)
    current, different, other_dtype = {}, [], []
    for name, info in metadata["modules"].items():
        module = named.get(name)
        if module is None or not is_supported_layer(module):
            raise BaseModelMismatchError(
                f"base model has no linear module {name!r} that the adapter needs",
                "load the adapter onto the base model it was trained on "
                f"({metadata.get('base_model', {}).get('name_or_path') or 'see adapter.json'})",
            )
        shape = linear_shape(module)
        if shape != (info["in"], info["out"]):
            raise BaseModelMismatchError(
                f"base module {name} is {shape[0]} -> {shape[1]} but the adapter expects {info['in']} -> {info['out']}",
                "load the adapter onto the base model it was trained on",
            )
        frozen = frozen_base(module)
        current[name] = frozen_fingerprint(frozen)
        saved = info["base_fingerprint"]
        if isinstance(saved, str):  # format version 1: an exact digest only
            verdict = "same" if saved == current[name].digest else DIFFERENT
            saved_dtype = info.get("base_dtype", current[name].dtype)
        else:
            saved_fingerprint = Fingerprint.from_json(saved)
            verdict, difference = saved_fingerprint.compare(current[name])
            saved_dtype = saved_fingerprint.dtype
            settings = info.get("base_quantization")
            if settings and frozen.quantization is None and isinstance(settings, dict):
                # trained on a quantized base, loaded on a full-precision one: quantize this weight the same way;
                # the same base gives the same quantized weight (exact digest), any other is refused
                verdict = _same_once_quantized(saved_fingerprint, frozen.dense_weight(), settings, verdict)
            elif settings and settings == frozen.quantization_settings() and verdict != DIFFERENT:
                # quantized the same way on both sides: the same base gives the same codes, so only the allowance
                # for a rare rounding flip applies, not the quantization error of both
                verdict = verdict if difference <= REQUANTIZED_TOLERANCE else DIFFERENT
        if verdict == DIFFERENT:
            different.append(name)
        elif verdict == SAME_OTHER_DTYPE:
            other_dtype.append((saved_dtype, current[name].dtype, difference))
    if different:
        name = different[0]
        qr = config.method == "mini" and config.mini_outer == "qr"
        if strict:
            raise BaseModelMismatchError(
                f"base module {name} has different weights than the adapter was trained on "
                f"({len(different)} of {len(current)} modules differ)",
                f"load it onto the same base model, {APPLY_ANYWAY}",
            )
        warnings.warn(
            f"base module {name} has different weights than the adapter was trained on ({len(different)} of "
            f"{len(current)} modules differ); applying it anyway"
            + (
                " (mini_outer='qr': its outer matrices are recomputed from THIS base, so the update changes too)"
                if qr
                else ""
            ),
            stacklevel=3,
        )
    if not other_dtype:
        return current, None
    quantized = [entry for entry in other_dtype if is_quantized(entry[0]) or is_quantized(entry[1])]
    if quantized:
        return current, (quantized[0][0], quantized[0][1], max(e[2] for e in quantized), len(quantized))
    return current, other_dtype[0][:2]


def check_recomputed(layers: dict, metadata: dict, *, strict: bool = True) -> tuple[str, float] | None:
    """Compare the update of factors rebuilt from the base (LoRA-XS, LoRA-Mini "qr", OLoRA) with the sketch the file
    holds (`lorakit.fingerprint`); returns (module, relative change) of the largest change, or None (nothing to
    check). Past RECOMPUTE_TOLERANCE: refused, or with `strict=False` a warning stating the change."""
    changes = {}
    for name, layer in layers.items():
        saved = metadata["modules"][name].get("update_sketch")
        recomputed = layer.recomputed_factors()
        if saved is not None and recomputed is not None:
            changes[name] = sketch_change(sketch_from_json(saved), update_sketch(*recomputed, layer.scale))
    if not changes:
        return None
    worst = max(changes, key=changes.get)
    past = sum(change > RECOMPUTE_TOLERANCE for change in changes.values())
    if past:
        method, dtype = layers[worst].method, metadata["modules"][worst]["base_dtype"]
        message = (
            f"{method} rebuilds frozen factors from the base weights, and from this base they change "
            f"{layers[worst].recomputed_part} of {worst} by about {changes[worst]:.0%} ({past} of {len(changes)} "
            f"modules past {RECOMPUTE_TOLERANCE:.0%})"
        )
        if strict:
            raise BaseModelMismatchError(
                message, f"load it onto the {dtype} base it was trained on (or merge or export it there), {APPLY_ANYWAY}"
            )
        warnings.warn(f"{message}; applying it anyway", stacklevel=3)
    return worst, changes[worst]


# The same weights quantized here and where the adapter was trained (another device, another bitsandbytes build) may
# round a rare element to the neighbouring code: 1% of the sampled norm allows a few such flips, nothing more.
REQUANTIZED_TOLERANCE = 0.01


def _same_once_quantized(saved: Fingerprint, weight, settings: dict, verdict: str) -> str:
    from .quantize import quantized_copy

    try:
        requantized = Fingerprint.of(quantized_copy(weight, settings), dtype=saved.dtype)
    except (ImportError, KeyError, ValueError, RuntimeError, ConfigError):  # no bitsandbytes, unknown settings
        return verdict
    _, difference = saved.compare(requantized)  # 0.0 for the same bits
    return SAME_OTHER_DTYPE if difference <= REQUANTIZED_TOLERANCE else DIFFERENT


def load_adapter(model: nn.Module, directory, *, name: str | None = None, strict: bool = True) -> nn.Module:
    """Apply the adapter in `directory` to `model` (its ORIGINAL base model), in place; returns the model.

    On a plain model the adapter is "default" (or `name`) and active. On an adapted model it is added beside the
    others under `name` (required, new) and stays idle until `set_active` (as PEFT's `load_adapter`); the base
    check applies to each adapter. `strict=False` turns a base-weight mismatch into a warning (shapes must still
    match).
    """
    metadata, config, tensors = read_adapter(directory)
    if is_adapted(model) and name is None:
        raise ConfigError(
            "the model already has adapters; name this one: load_adapter(model, directory, name=...), or load it "
            "onto a fresh base model"
        )
    adapter = new_adapter_name(model, name)
    if is_adapted(model) and any(metadata.get(extra.FILE_KEY) for extra in EXTRAS):
        raise ConfigError(
            f"{directory} has modules_to_save or trainable tokens, which belong to a model's first adapter only "
            "(they are model-wide); load it onto a fresh base model"
        )
    fingerprints, other_dtype = _compare_base(model, metadata, config, strict=strict)
    layer_cls = METHODS[config.method]
    configs = {name: module_config(config, info) for name, info in metadata["modules"].items()}
    for name, info in metadata["modules"].items():
        expected = layer_cls.stored_shapes(configs[name], info["in"], info["out"])
        saved = {key: tuple(shape) for key, shape in info["tensors"].items()}
        if not layer_cls.accepts_file_shapes(configs[name], info["in"], info["out"], saved):
            raise AdapterFileError(
                f"{directory}: module {name} tensors do not fit the config {expected}; save it again"
            )
    groups: dict[tuple, list[str]] = {}  # modules of one (r, alpha) are built together
    for name, module in configs.items():
        groups.setdefault((module.r, module.alpha), []).append(name)
    layers = {}
    try:
        for names in groups.values():
            exact = dataclasses.replace(configs[names[0]], targets=names, exclude=None)
            layers.update(build_layers(model, exact, initialize=False, fingerprints=fingerprints, name=adapter))
    except ConfigError as exc:
        raise AdapterFileError(f"adapter at {directory} cannot be applied: {exc}") from None
    layers = {name: layers[name] for name in metadata["modules"]}  # the file's order
    shared = next((layer.shared for layer in layers.values() if layer.shared is not None), None)
    saved_shared = (metadata.get("shared") or {}).get("tensors", {})
    wanted = {} if shared is None else {key: tuple(value.shape) for key, value in shared.stored_tensors().items()}
    if wanted != {key: tuple(shape) for key, shape in saved_shared.items()}:
        raise AdapterFileError(
            f"{directory}: shared tensors {saved_shared} do not fit the config {wanted}; save it again"
        )
    if shared is not None:
        shared.load_tensors({key: tensors[f"{SHARED}.{key}"] for key in shared.stored})
    for name, layer in layers.items():
        layer.config = configs[name]
        try:
            layer.load_file_fields(metadata["modules"][name].get("fields") or {})
        except (ValueError, TypeError) as exc:
            raise AdapterFileError(f"{directory}: module {name} has invalid 'fields' ({exc}); save it again") from None
        layer.load_tensors({key: tensors[f"{name}.{key}"] for key in metadata["modules"][name]["tensors"]})
    recomputed = check_recomputed(layers, metadata, strict=strict)  # before the model is touched
    extras = [extra.from_file(model, metadata.get(extra.FILE_KEY), tensors, strict=strict) for extra in EXTRAS]
    if other_dtype:
        message = _dtype_message(*other_dtype)
        if recomputed is not None:
            layer = layers[recomputed[0]]
            message += (
                f", and {layer.method}'s factors rebuilt from it change {layer.recomputed_part} by up to about "
                f"{recomputed[1]:.2%}"
            )
        elif any(
            layer.recomputed_factors() is not None and not metadata["modules"][name].get("derived_from_links")
            for name, layer in layers.items()
        ):
            method = next(iter(layers.values())).method
            message += (
                f", and {method}'s frozen factors are rebuilt from it by an amount this file (saved before lorakit "
                "checked it) cannot tell; re-save it on the base it was trained on to have it checked"
            )
        warnings.warn(message, stacklevel=2)
    install(model, layers, name=adapter)
    for extra, modules in zip(EXTRAS, extras):
        extra.install(model, modules)
    return model
