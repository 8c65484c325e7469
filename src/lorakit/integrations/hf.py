"""Hooks on an adapted model that make transformers' Trainer save, checkpoint and resume a lorakit adapter.

How the Trainer (transformers 5.x, `trainer.py`) reaches a `PreTrainedModel`, and what lorakit puts there:

- `Trainer.save_model(dir)` and `_save_checkpoint` (every `checkpoint-N/`) go through `_save`, which calls
  `model.save_pretrained(dir, state_dict=None, is_main_process=...)`. `install_trainer_hooks` replaces that method
  on the model instance: it writes a lorakit adapter directory (adapter.json + adapter.safetensors: what
  `lorakit.load_adapter` reads, with its strict base check) and RESUME_FILE, never the frozen base. The Trainer
  writes its own files beside them (optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json,
  training_args.bin, the tokenizer).
- `train(resume_from_checkpoint=dir)` (`_load_from_checkpoint`) and `load_best_model_at_end` (`_load_best_model`)
  accept a directory only if it holds a file they know (model.safetensors, pytorch_model.bin, their sharded
  indexes; PEFT's adapter_model.* only for a PeftModel, which a lorakit model is not) and then call
  `model.load_state_dict(load_file(dir / "model.safetensors"), strict=False)`. Hence RESUME_FILE's name: it holds
  the model's own adapter tensors, a training procedure's state and a JSON header (config, per-module base
  fingerprints, procedure), no base weight. A load_state_dict pre-hook recognises it by the header and checks it
  against the adapted model before touching anything (the same config, modules, shapes, base weights by
  fingerprint and procedure; one-line errors otherwise), then copies the tensors into the existing layers with
  `AdapterLayer.load_tensors`, as `lorakit.load_adapter` does, and hands an attached procedure its state. A
  post-hook then drops the frozen base (absent on purpose) from the missing keys, so the Trainer does not warn.
  Any other state dict loads as before.

RESUME_FILE repeats the tensors of adapter.safetensors (the Trainer hands the model tensors, never the directory,
so the data the check needs has to travel with them): model files of about twice the adapter, no base. With Chain
of LoRA the two differ: adapter.safetensors is the final form (all links as one LoRA, `layers_to_save`),
RESUME_FILE the current link, with the finished ones as procedure tensors.

Scope: one process or DDP. Under FSDP or DeepSpeed ZeRO-3 the layers hold shards, and the save refuses with one
line (`lorakit train --fsdp` trains sharded).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from .. import __version__
from ..atomic import write_bytes
from ..config import AdapterConfig
from ..errors import AdapterFileError, BaseModelMismatchError, ConfigError
from ..fingerprint import DIFFERENT, SAME_OTHER_DTYPE, Fingerprint, tolerance
from ..inject import EXTRAS, SHARED, _require_adapted, adapter_layers, is_adapted, shared_parameters
from ..persist import read_adapter, save_adapter

RESUME_FILE = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME: the file the Trainer loads on resume
HEADER_KEY = "lorakit_resume"  # a uint8 tensor holding the JSON header
PROCEDURE_PREFIX = "lorakit_procedure."
RESUME_FORMAT = "lorakit-trainer-resume"
RESUME_VERSION = 1
_HANDLES = "_lorakit_trainer_hooks"  # instance attributes (plain, not parameters or buffers)
_PROCEDURE = "_lorakit_procedure"
_RESTORED = "_lorakit_restored_prefix"


# ----------------------------------------------------------------------------------------------- installing
def install_trainer_hooks(model: nn.Module) -> nn.Module:
    """Make `model.save_pretrained(dir)` write a lorakit adapter directory and `model.load_state_dict` restore one
    from a Trainer checkpoint, on this model instance only; idempotent. Returns the model."""
    if trainer_hooks_installed(model):
        return model
    handles = (
        model.register_load_state_dict_pre_hook(_restore_pre_hook),
        model.register_load_state_dict_post_hook(_restore_post_hook),
    )
    if callable(getattr(type(model), "save_pretrained", None)):
        object.__setattr__(model, "save_pretrained", _SavePretrained(model))
    if getattr(model, "is_quantized", False):
        # transformers' Trainer refuses a quantized model without adapters ("purely quantized"); this is its own
        # marker that adapters are attached (it also makes gradient checkpointing give the inputs a gradient)
        model._hf_peft_config_loaded = True
    object.__setattr__(model, _HANDLES, handles)
    return model


def trainer_hooks_installed(model: nn.Module) -> bool:
    return model.__dict__.get(_HANDLES) is not None


def remove_trainer_hooks(model: nn.Module) -> nn.Module:
    """Undo `install_trainer_hooks` (and detach any procedure): the model saves and loads as transformers does."""
    for handle in model.__dict__.pop(_HANDLES, None) or ():
        handle.remove()
    model.__dict__.pop("save_pretrained", None)
    model.__dict__.pop(_PROCEDURE, None)
    model.__dict__.pop("_hf_peft_config_loaded", None)
    return model


def attach_procedure(model: nn.Module, procedure) -> None:
    """Saves now write `procedure`'s final adapter and state; a resume hands it its state (`ProcedureCallback`)."""
    install_trainer_hooks(model)
    object.__setattr__(model, _PROCEDURE, procedure)


def attached_procedure(model: nn.Module):
    return model.__dict__.get(_PROCEDURE)


# ----------------------------------------------------------------------------------------------- saving
class _SavePretrained:
    """`model.save_pretrained` of an adapted model, bound to it; a copy of the model (copy.deepcopy, pickling) gets its own."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        return _save_pretrained(self.model, *args, **kwargs)

    def __reduce__(self):
        return (_SavePretrained, (self.model,))


def _save_pretrained(model, save_directory, is_main_process=True, state_dict=None, push_to_hub=False, **kwargs):
    """`PreTrainedModel.save_pretrained` of an adapted model: a lorakit adapter directory (see the module doc)."""
    if not is_adapted(model):  # lorakit.unload / merge_and_unload: a plain model again
        return type(model).save_pretrained(
            model,
            save_directory,
            is_main_process=is_main_process,
            state_dict=state_dict,
            push_to_hub=push_to_hub,
            **kwargs,
        )
    if push_to_hub:
        raise ConfigError(
            "save_pretrained(push_to_hub=True) is not available for a lorakit-adapted model; save to a directory "
            "and upload that (huggingface_hub.upload_folder)"
        )
    if not is_main_process:
        return None
    save_for_trainer(model, save_directory)
    return None


def save_for_trainer(model: nn.Module, directory) -> Path:
    """Write what `save_pretrained` writes for the Trainer: the lorakit adapter (with an attached procedure, its
    `layers_to_save`) and RESUME_FILE. Returns the directory."""
    layers = _require_adapted(model)
    _refuse_sharded(model, layers)
    procedure = attached_procedure(model)
    final = procedure.layers_to_save(model) if procedure is not None else None
    out = save_adapter(model, directory, layers=final)
    write_bytes(out / RESUME_FILE, _resume_blob(model, layers, procedure))
    return out


def _refuse_sharded(model: nn.Module, layers) -> None:
    shared = shared_parameters(model)
    tensors = [t for _, layer in layers for t in layer.stored_tensors().values()]
    tensors += list(shared.stored_tensors().values()) if shared is not None else []
    if any(type(t).__name__ == "DTensor" or t.numel() == 0 for t in tensors):
        raise ConfigError(
            "the adapter's tensors are sharded (FSDP or DeepSpeed ZeRO-3), and lorakit's Trainer integration saves "
            "whole tensors; train on one process or with DDP, or shard with `lorakit train --fsdp`"
        )


def _cpu(tensors: dict) -> dict:
    return {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}


def _resume_blob(model: nn.Module, layers, procedure) -> bytes:
    tensors, modules = {}, {}
    for name, layer in layers:
        stored = _cpu(layer.stored_tensors())
        tensors.update({f"{name}.{key}": value for key, value in stored.items()})
        modules[name] = {
            "base_fingerprint": layer.base_fingerprint.to_json(),
            "tensors": {key: list(value.shape) for key, value in stored.items()},
        }
    header = {
        "format": RESUME_FORMAT,
        "format_version": RESUME_VERSION,
        "lorakit_version": __version__,
        "config": layers[0][1].config.to_dict(),
        "modules": modules,
        "shared": None,
        "procedure": None,
    }
    shared = shared_parameters(model)
    if shared is not None:
        stored = _cpu(shared.stored_tensors())
        tensors.update({f"{SHARED}.{key}": value for key, value in stored.items()})
        header["shared"] = {"tensors": {key: list(value.shape) for key, value in stored.items()}}
    for extra in EXTRAS:  # the trained copies of modules_to_save, the trainable token rows
        tensors.update(extra.to_file(model)[0])
    if procedure is not None:
        extra = _cpu(procedure.state_tensors(model))
        tensors.update({PROCEDURE_PREFIX + key: value for key, value in extra.items()})
        header["procedure"] = {
            "name": procedure.name,
            "settings": procedure.settings,
            "state": procedure.state_dict(),
            "tensors": {key: list(value.shape) for key, value in extra.items()},
        }
    tensors[HEADER_KEY] = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
    return save_safetensors(tensors, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------- restoring
def _restore_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    if prefix + HEADER_KEY not in state_dict:
        return  # not a lorakit resume file: load as usual
    header = _parse_header(state_dict.pop(prefix + HEADER_KEY))
    ours = [key for key in state_dict if key.startswith(prefix)]
    tensors = {key[len(prefix) :]: state_dict.pop(key) for key in ours}
    restore(module, header, tensors)
    object.__setattr__(module, _RESTORED, prefix)


def _restore_post_hook(module, incompatible_keys) -> None:
    prefix = module.__dict__.pop(_RESTORED, None)
    if prefix is not None:  # the frozen base is absent from a resume file on purpose
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(prefix)]


def _corrupt(problem: str) -> AdapterFileError:
    return AdapterFileError(
        f"the checkpoint's {RESUME_FILE} has {problem}; it is damaged or from another tool: resume from another "
        "checkpoint"
    )


def _parse_header(tensor: torch.Tensor) -> dict:
    try:
        header = json.loads(bytes(tensor.to(torch.uint8).reshape(-1).numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RuntimeError, TypeError):
        raise _corrupt("an unreadable lorakit header") from None
    if not isinstance(header, dict) or header.get("format") != RESUME_FORMAT:
        raise _corrupt("a header of an unknown format")
    version = header.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _corrupt("no valid format version")
    if version > RESUME_VERSION:
        raise AdapterFileError(
            f"the checkpoint was written by a newer lorakit ({header.get('lorakit_version')}); this lorakit "
            f"{__version__} reads resume format {RESUME_VERSION}: upgrade lorakit to resume it"
        )
    for key, kind in (("config", dict), ("modules", dict)):
        if not isinstance(header.get(key), kind):
            raise _corrupt(f"no {key!r} in its header")
    for name, info in header["modules"].items():
        if not isinstance(info, dict) or not isinstance(info.get("tensors"), dict):
            raise _corrupt(f"an invalid entry for module {name!r}")
    if header.get("shared") is not None and not isinstance(header["shared"].get("tensors"), dict):
        raise _corrupt("an invalid 'shared' entry")
    procedure = header.get("procedure")
    if procedure is not None and not (
        isinstance(procedure, dict)
        and isinstance(procedure.get("name"), str)
        and isinstance(procedure.get("settings"), dict)
        and isinstance(procedure.get("tensors"), dict)
    ):
        raise _corrupt("an invalid 'procedure' entry")
    return header


def restore(model: nn.Module, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Check a resume file (header + tensors) against the adapted model, then load it (adapter and procedure)."""
    if not is_adapted(model):
        raise ConfigError(
            "the checkpoint holds a lorakit adapter but the model has none; call lorakit.adapt(model, config) with "
            "the run's config before resuming"
        )
    layers = list(adapter_layers(model))
    try:
        saved = AdapterConfig.from_dict(header["config"])
    except (ConfigError, TypeError) as exc:
        raise _corrupt(f"an invalid adapter config ({exc})") from None
    procedure = attached_procedure(model)
    saved_procedure = header.get("procedure")
    procedure_tensors = {k[len(PROCEDURE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(PROCEDURE_PREFIX)}
    adapter_tensors = {k: v for k, v in tensors.items() if not k.startswith(PROCEDURE_PREFIX)}
    check_adapter(model, layers, saved, header["modules"], header.get("shared"), adapter_tensors, "the checkpoint")
    _check_procedure(procedure, saved_procedure, procedure_tensors)
    load_into_layers(model, layers, adapter_tensors)
    if procedure is not None:
        procedure.load_state_dict(saved_procedure.get("state") or {}, procedure_tensors, model)


def _describe_procedure(name: str, settings: dict) -> str:
    return name + "".join(f":{k}={v}" for k, v in settings.items())


def _check_procedure(procedure, saved: dict | None, tensors: dict) -> None:
    if saved is None:
        if procedure is not None:
            raise ConfigError(
                f"the checkpoint was trained without a procedure, but ProcedureCallback({procedure.name!r}) is "
                "attached; resume with the run's callbacks"
            )
        if tensors:
            raise _corrupt("procedure tensors but no procedure")
        return
    if procedure is None:
        raise ConfigError(
            f"the checkpoint was trained with procedure {_describe_procedure(saved['name'], saved['settings'])}; "
            f"pass lorakit.integrations.ProcedureCallback({saved['name']!r}) to the Trainer to resume it"
        )
    if procedure.name != saved["name"] or _json(procedure.settings) != _json(saved["settings"]):
        raise ConfigError(
            f"the checkpoint was trained with procedure {_describe_procedure(saved['name'], saved['settings'])}, "
            f"the Trainer has {procedure.describe()}; resume with the same procedure and options"
        )
    wanted = {key: tuple(shape) for key, shape in saved["tensors"].items()}
    if {key: tuple(value.shape) for key, value in tensors.items()} != wanted:
        raise _corrupt(f"procedure tensors that do not match its header ({sorted(wanted)[:3]})")


def _json(value):
    return json.loads(json.dumps(value))


def _comparable(config: AdapterConfig) -> dict:
    """The config fields that define the adapted model (targets are compared as module names instead)."""
    values = _json(config.to_dict())
    values.pop("targets")
    values.pop("exclude")
    return values


def check_adapter(model, layers, saved: AdapterConfig, modules: dict, shared_info, tensors, where, strict=True):
    """Check saved adapter tensors (with their config, per-module entries and base fingerprints, as in
    adapter.json) against an already adapted model, before anything is loaded."""
    theirs, ours = _comparable(saved), _comparable(layers[0][1].config)
    if theirs != ours:
        field = next(key for key in ours if theirs.get(key) != ours[key])
        raise ConfigError(
            f"{where} holds an adapter with {field}={theirs.get(field)!r} but the model is adapted with "
            f"{field}={ours[field]!r}; adapt the model with the run's lorakit.AdapterConfig"
        )
    names = [name for name, _ in layers]
    if set(modules) != set(names):
        only_model = sorted(set(names) - set(modules))[:2]
        only_saved = sorted(set(modules) - set(names))[:2]
        raise ConfigError(
            f"{where} adapts other modules than the model (only in the model: {only_model}, only in the "
            f"checkpoint: {only_saved}); adapt the model with the run's targets"
        )
    expected = {}
    for name, layer in layers:
        own = {key: tuple(value.shape) for key, value in layer.stored_tensors().items()}
        saved_shapes = {key: tuple(shape) for key, shape in modules[name]["tensors"].items()}
        if not type(layer).accepts_file_shapes(layer.config, layer.in_features, layer.out_features, saved_shapes):
            raise AdapterFileError(f"{where}: the tensors of module {name} do not fit the model's layer {own}")
        expected.update({f"{name}.{key}": shape for key, shape in saved_shapes.items()})
    shared = shared_parameters(model)
    own_shared = {} if shared is None else {k: tuple(v.shape) for k, v in shared.stored_tensors().items()}
    saved_shared = {k: tuple(s) for k, s in ((shared_info or {}).get("tensors") or {}).items()}
    if saved_shared != own_shared:
        raise AdapterFileError(f"{where}: shared tensors {saved_shared} do not fit the model's {own_shared}")
    expected.update({f"{SHARED}.{key}": shape for key, shape in own_shared.items()})
    for extra in EXTRAS:
        expected.update(extra.file_shapes(extra.to_file(model)[1]))
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(expected))[:3]
        raise AdapterFileError(
            f"{where}: the tensors do not match the model's adapter (missing {missing}, unexpected {extra})"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape or not tensors[key].is_floating_point():
            raise AdapterFileError(f"{where}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    _check_base(layers, modules, where, strict)


def _check_base(layers, modules: dict, where: str, strict: bool) -> None:
    different, other_dtype = [], []
    for name, layer in layers:
        saved = modules[name].get("base_fingerprint")
        current = layer.base_fingerprint
        if isinstance(saved, str):  # adapter format version 1: an exact digest only
            verdict = "same" if saved == current.digest else DIFFERENT
            saved_dtype = current.dtype
        else:
            try:
                fingerprint = Fingerprint.from_json(saved)
            except (ValueError, TypeError):
                raise AdapterFileError(f"{where}: module {name} has an invalid base fingerprint") from None
            verdict, _ = fingerprint.compare(current)
            saved_dtype = fingerprint.dtype
        if verdict == DIFFERENT:
            different.append(name)
        elif verdict == SAME_OTHER_DTYPE:
            other_dtype.append((saved_dtype, current.dtype))
    if different:
        message = (
            f"base module {different[0]} has different weights than {where} was trained on ({len(different)} of "
            f"{len(layers)} modules differ)"
        )
        if strict:
            raise BaseModelMismatchError(message, "adapt the same base model, or pass strict=False")
        warnings.warn(message + "; loading it anyway", stacklevel=4)
    if other_dtype:
        saved_dtype, now_dtype = other_dtype[0]
        warnings.warn(
            f"{where} was trained on a {saved_dtype} base and this base is {now_dtype} (the same weights within "
            f"{tolerance(saved_dtype, now_dtype):.1e} relative)",
            stacklevel=4,
        )


def load_into_layers(model: nn.Module, layers, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checked stored tensors into the existing adapter layers (and the shared owner), as load_adapter does."""
    shared = shared_parameters(model)
    if shared is not None:
        shared.load_tensors({key: tensors[f"{SHARED}.{key}"] for key in shared.stored})
    for name, layer in layers:
        prefix = f"{name}."
        own = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        layer.load_tensors({key: value for key, value in own.items() if "." not in key})
    for extra in EXTRAS:
        extra.load_into(model, tensors)


def load_adapter_into(model: nn.Module, directory, *, strict: bool = True) -> nn.Module:
    """Load a saved lorakit adapter into a model ALREADY adapted with the same config (e.g. to continue training
    from a checkpoint by hand): the file is read and validated as `lorakit.load_adapter` does, the config, modules,
    shapes and base fingerprints must match the model's, then the stored tensors are copied into its layers.

    `strict=False` turns a base-weight mismatch into a warning. Returns the model.
    """
    metadata, config, tensors = read_adapter(directory)
    layers = _require_adapted(model)
    check_adapter(
        model, layers, config, metadata["modules"], metadata.get("shared"), tensors, f"adapter {directory}", strict
    )
    load_into_layers(model, layers, tensors)
    return model
