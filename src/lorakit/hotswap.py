"""Hot swap: replace one adapter's weights in place, for serving.

`hotswap_adapter(model, directory, adapter_name)` reads an adapter file of the same method, targets, shapes and
scale as the adapter it replaces, checks it against the base like `load_adapter`, and copies its tensors into the
existing parameters and buffers with `copy_`. No module is created or replaced and no Python attribute changes, so
a model compiled with `torch.compile` runs the new adapter without compiling again (tested with
`torch._dynamo.config.error_on_recompile`), and a mixed batch's cached stacks are rebuilt from the new tensors
(`lorakit.routing` keys them on the tensors' versions). PEFT's `hotswap_adapter` (peft.utils.hotswap) does the same
for LoRA, and pads ranks for compiled models; lorakit requires equal shapes.

Frozen tensors rebuilt from the seed or the base (LoRA-Mini's outer matrices, LoRA-XS's SVD, OLoRA's A0, B0) are
rebuilt for the new file, so two adapters of other seeds swap too.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import AdapterFileError, ConfigError
from .inject import _require_adapted, shared_parameters
from .persist import _compare_base, check_recomputed, module_config, read_adapter


def _forward_config(config) -> dict:
    """The config fields a forward reads (a swap may change only the seed and the init)."""
    return {key: value for key, value in config.to_dict().items() if key not in ("seed", "init", "targets")}


@torch.no_grad()
def hotswap_adapter(model: nn.Module, directory, adapter_name: str = "default", *, strict: bool = True) -> nn.Module:
    """Copy the adapter in `directory` into adapter `adapter_name` of `model`, in place (see the module doc)."""
    current = dict(_require_adapted(model, adapter_name))
    metadata, config, tensors = read_adapter(directory)
    first = next(iter(current.values()))
    if config.method != first.method or set(metadata["modules"]) != set(current):
        raise ConfigError(
            f"{directory} ({config.method}, {len(metadata['modules'])} modules) does not match adapter "
            f"{adapter_name!r} ({first.method}, {len(current)} modules); hot swap needs the same method and targets, "
            "else load_adapter it under a new name"
        )
    fingerprints, _ = _compare_base(model, metadata, config, strict=strict)
    fresh = {}
    for name, info in metadata["modules"].items():
        layer = current[name]
        module = module_config(config, info)
        if _forward_config(module) != _forward_config(layer.config):
            raise ConfigError(
                f"{directory}: module {name} has another config than adapter {adapter_name!r} (r, alpha, options); "
                "hot swap needs the same, else load_adapter it under a new name"
            )
        new = type(layer)(
            layer.base_layer, module, name, initialize=False, fingerprint=fingerprints[name], shared=layer.shared
        )
        saved = {key: tuple(shape) for key, shape in info["tensors"].items()}
        if saved != {key: tuple(value.shape) for key, value in new.stored_tensors().items()}:
            raise AdapterFileError(f"{directory}: module {name} tensors {saved} do not fit; save it again")
        new.load_file_fields(metadata["modules"][name].get("fields") or {})
        new.load_tensors({key: tensors[f"{name}.{key}"] for key in info["tensors"]})
        fresh[name] = new
    check_recomputed(fresh, metadata, strict=strict)
    shared = shared_parameters(model, adapter_name)
    wanted = {} if shared is None else {key: list(value.shape) for key, value in shared.stored_tensors().items()}
    if wanted != (metadata.get("shared") or {}).get("tensors", {}):
        raise AdapterFileError(f"{directory}: its shared tensors do not fit adapter {adapter_name!r}; save it again")
    if shared is not None:
        shared.load_tensors({key: tensors[f"lorakit_shared.{key}"] for key in shared.stored})
    for name, new in fresh.items():
        layer = current[name]
        for key, value in (*new.named_parameters(recurse=False), *new.named_buffers(recurse=False)):
            getattr(layer, key).copy_(value)
        layer.load_file_fields(new.file_fields())
    return model
