"""Modules trained in full beside the adapters: `AdapterConfig(modules_to_save=[...])`, PEFT's `modules_to_save`.

    y = copy(x)        (adapters on), with copy = a trainable deep copy of the original module
    y = original(x)    (`disabled()`), the original frozen and never written to

Used for a new or changed head (a classifier's `score`, an `lm_head`) or any module that must move as a whole.
`unload()` puts the original back, bit for bit; `merge_and_unload()` puts the trained copy in its place; `merge()`
leaves the copies as they are (they are already dense: there is nothing to fold). A copy of a head tied to the
input embedding is its own tensor: training it leaves the embedding alone (tied rows of new tokens: `token_rows`).

Names match as `targets` do: a module whose full name is the suffix or ends in "." + suffix ("norm" selects
`model.norm`, not `input_layernorm`, as PEFT 0.22 matches; earlier PEFT had no dot boundary). The adapter file stores each copy's
floating tensors and a fingerprint (`lorakit.fingerprint`) of each tensor of the ORIGINAL, so a load onto another
base is refused (strict) or warned about as for the adapted layers; the same weights in another dtype pass.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import swap
from .config import AdapterConfig
from .errors import APPLY_ANYWAY, BaseModelMismatchError, ConfigError
from .fingerprint import DIFFERENT, Fingerprint

FILE_KEY = "modules_to_save"  # the adapter.json section, and the prefix of the tensors in adapter.safetensors


class SavedModule(nn.Module):
    """A frozen `original` and its trainable copy `trained`; forward runs the copy unless `disabled`."""

    def __init__(self, original: nn.Module, name: str, fingerprints: dict[str, Fingerprint] | None = None):
        super().__init__()
        self.name = name
        self.base_fingerprints = fingerprints or {
            key: Fingerprint.of(value) for key, value in original.state_dict().items() if value.is_floating_point()
        }
        self.original = original.requires_grad_(False)
        self.trained = copy.deepcopy(original)
        for param in self.trained.parameters():
            if param.is_floating_point():
                param.requires_grad_(True)
        self.disabled = False

    def forward(self, *args, **kwargs):
        return (self.original if self.disabled else self.trained)(*args, **kwargs)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {key: p for key, p in self.trained.named_parameters() if p.is_floating_point()}

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {key: value for key, value in self.trained.state_dict().items() if value.is_floating_point()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = self.trained.state_dict()
        with torch.no_grad():
            for key, value in tensors.items():
                state[key].copy_(value)


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for name, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield name, module


def covered(name: str, saved: list[str]) -> str | None:
    """The saved module that is `name` or holds it, or None."""
    return next((s for s in saved if name == s or name.startswith(s + ".")), None)


def find_saved(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Full names of the modules `config.modules_to_save` selects (outermost only); ConfigError if one matches none."""
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n]
    found = []
    for suffix in config.modules_to_save:
        matched = [n for n in names if n == suffix or n.endswith("." + suffix)]
        if not matched:
            examples = ", ".join(list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names if not n[-1].isdigit()))[:8])
            raise ConfigError(f"modules_to_save {suffix!r} matches no module; some module names are: {examples}, ...")
        found += matched
    found = sorted(set(found), key=names.index)
    return [n for n in found if covered(n, [s for s in found if s != n]) is None]


def build(model: nn.Module, names: list[str], fingerprints: dict | None = None) -> dict[str, SavedModule]:
    """One `SavedModule` per name (not yet installed)."""
    fingerprints = fingerprints or {}
    return {name: SavedModule(model.get_submodule(name), name, fingerprints.get(name)) for name in names}



def unload(model: nn.Module, *, keep_trained: bool = False) -> None:
    """Put each original back (`keep_trained`: each trained copy, as `merge_and_unload` does)."""
    for name, module in list(saved_modules(model)):
        swap.set_module(model, name, module.trained if keep_trained else module.original)


# the EXTRAS interface shared with the other wrappers (lorakit.swap)
install, set_disabled, restore_disabled, trainable_parameters = swap.functions_for(saved_modules)


# ----------------------------------------------------------------- the adapter file
def to_file(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors keyed "modules_to_save.<module>.<tensor>", the adapter.json section) of the model's saved modules."""
    tensors, info = {}, {}
    for name, module in saved_modules(model):
        stored = {key: value.detach().to("cpu").contiguous() for key, value in module.stored_tensors().items()}
        tensors.update({f"{FILE_KEY}.{name}.{key}": value for key, value in stored.items()})
        info[name] = {
            "class": type(module.original).__name__,
            "tensors": {key: list(value.shape) for key, value in stored.items()},
            "base_fingerprints": {key: fp.to_json() for key, fp in module.base_fingerprints.items()},
        }
    return tensors, info


def validate(info, fail) -> None:
    """Check the adapter.json section (`fail(problem)` raises)."""
    if info is None:
        return
    if not isinstance(info, dict) or not info:
        fail(f"'{FILE_KEY}' must be an object of modules")
    for name, entry in info.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            fail(f"{FILE_KEY} entry {name!r} lacks 'tensors'")
        fingerprints = entry.get("base_fingerprints")
        if not isinstance(fingerprints, dict) or set(fingerprints) != set(entry["tensors"]):
            fail(f"{FILE_KEY} entry {name!r} needs one base fingerprint per tensor")
        for key, shape in entry["tensors"].items():
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                fail(f"{FILE_KEY} entry {name!r} tensor {key!r} has an invalid shape")
            try:
                Fingerprint.from_json(fingerprints[key])
            except (ValueError, TypeError) as exc:
                fail(f"{FILE_KEY} entry {name!r} has an invalid base fingerprint for {key!r} ({exc})")


def file_shapes(info: dict | None) -> dict[str, tuple[int, ...]]:
    return {
        f"{FILE_KEY}.{name}.{key}": tuple(shape)
        for name, entry in (info or {}).items()
        for key, shape in entry["tensors"].items()
    }


def from_file(model: nn.Module, info: dict | None, tensors: dict, *, strict: bool = True) -> dict[str, SavedModule]:
    """Check each original against its fingerprints and build (not install) the saved modules with the file's
    copies. A different original is refused (strict) or warned about, in the words of the adapted layers' check."""
    if not info:
        return {}
    named = dict(model.named_modules())
    different, fingerprints = [], {}
    for name, entry in info.items():
        module = named.get(name)
        state = module.state_dict() if module is not None else {}
        floating = {key: value for key, value in state.items() if value.is_floating_point()}
        shapes = {key: list(value.shape) for key, value in floating.items()}
        if module is None or shapes != entry["tensors"]:
            raise BaseModelMismatchError(
                f"base model has no module {name!r} of the shapes the adapter's modules_to_save holds",
                "load the adapter onto the base model it was trained on",
            )
        saved = {key: Fingerprint.from_json(fp) for key, fp in entry["base_fingerprints"].items()}
        if any(saved[key].compare(Fingerprint.of(value))[0] == DIFFERENT for key, value in floating.items()):
            different.append(name)
        fingerprints[name] = saved
    if different:
        message = (
            f"base module {different[0]} has different weights than the adapter was trained on ({len(different)} of "
            f"{len(info)} modules_to_save differ)"
        )
        if strict:
            raise BaseModelMismatchError(message, f"load it onto the same base model, {APPLY_ANYWAY}")
        warnings.warn(f"{message}; applying it anyway", stacklevel=3)
    modules = {}
    for name, entry in info.items():
        # the fingerprints of the original it was trained on: a save of this load records the same
        modules[name] = SavedModule(named[name], name, fingerprints[name])
        modules[name].load_tensors({key: tensors[f"{FILE_KEY}.{name}.{key}"] for key in entry["tensors"]})
    return modules


def check_targets(names: list[str], saved: list[str], explicit: bool) -> list[str]:
    """Drop adapter targets inside a saved module ("all-linear"); refuse explicit ones (they cannot be both)."""
    inside = [(n, covered(n, saved)) for n in names if covered(n, saved) is not None]
    if inside and explicit:
        name, owner = inside[0]
        raise ConfigError(
            f"target {name!r} lies in modules_to_save {owner!r}, which trains it in full; remove it from one of them"
        )
    return [n for n in names if covered(n, saved) is None]


def load_into(model: nn.Module, tensors: dict) -> None:
    """Copy a file's (checked) tensors into the model's existing saved modules (resuming a Trainer run)."""
    for name, module in saved_modules(model):
        prefix = f"{FILE_KEY}.{name}."
        module.load_tensors({key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)})
