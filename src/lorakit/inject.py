"""Find target modules, wrap them in adapter layers, and the whole-model operations built on them."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from . import saved_modules, token_rows
from .config import AdapterConfig
from .errors import ConfigError
from .layer import AdapterLayer, SharedParameters, is_supported_layer, linear_shape
from .methods import METHODS

SHARED = "lorakit_shared"  # the attribute of the model that owns a method's shared tensors (LoRTA)
SHARED_ROW = "(shared by all layers)"  # the summary row of those tensors
EXTRAS = (saved_modules, token_rows)  # modules trained beside the adapters: each has the same few functions


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def _require_adapted(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    layers = list(adapter_layers(model))
    if not layers:
        raise ConfigError("the model has no lorakit adapters; call lorakit.adapt(model, config) first")
    return layers


def _output_head_names(model: nn.Module) -> set[str]:
    names = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    return names


def _matches(name: str, pattern) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the modules `config` selects; raises ConfigError if a target matches nothing or a non-linear layer."""
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if n and is_supported_layer(m)]
    if config.targets == "all-linear":
        heads = _output_head_names(model)
        names = [n for n in linear_names if n not in heads]
    else:
        names = [n for n in modules if n and _matches(n, config.targets)]
        if isinstance(config.targets, str):  # a regex may also match containers such as `mlp`: keep the linears
            names = [n for n in names if is_supported_layer(modules[n])]
        else:
            missing = [t for t in config.targets if not any(_matches(n, [t]) for n in names)]
            if missing:
                raise ConfigError(
                    f"targets {missing} match no module; some linear modules are: {_examples(linear_names)}"
                )
        wrong = [n for n in names if not is_supported_layer(modules[n])]
        if wrong:
            raise ConfigError(
                f"target {wrong[0]!r} is a {type(modules[wrong[0]]).__name__}, not a linear layer; "
                f"target nn.Linear / Conv1D modules such as {_examples(linear_names)}"
            )
    if config.exclude is not None:
        names = [n for n in names if not _matches(n, config.exclude)]
    names = saved_modules.check_targets(names, saved_modules.find_saved(model, config), config.targets != "all-linear")
    if not names:
        raise ConfigError(
            f"targets={config.targets!r} match no linear module; some available names: {_examples(linear_names)}"
        )
    return names


def _examples(names: list[str], count: int = 6) -> str:
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    shown = suffixes[:count] or ["(none)"]
    return ", ".join(shown) + (", ..." if len(suffixes) > count else "")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapt(model: nn.Module, config: AdapterConfig, *, initialize: bool = True) -> nn.Module:
    """Wrap the modules `config` targets in adapter layers, in place; freeze everything but the adapters.

    Every check runs before the model is touched, so a ConfigError leaves the model as it was.
    """
    layers = build_layers(model, config, initialize=initialize)
    saved = saved_modules.build(model, saved_modules.find_saved(model, config))
    rows = token_rows.build(model, config, list(layers), list(saved))
    _warn_useless_rank(config, layers)
    install(model, layers)
    saved_modules.install(model, saved)
    token_rows.install(model, rows)
    return model


def _warn_useless_rank(config: AdapterConfig, layers: dict[str, AdapterLayer]) -> None:
    """One line when r exceeds, on some adapted module, the largest rank the method's update can use there."""
    limits = {}
    for name, layer in layers.items():
        limit = type(layer).useful_rank(config, layer.in_features, layer.out_features)
        if limit is not None:
            limits[name] = (*limit, layer.in_features, layer.out_features)
    over = {name: limit for name, limit in limits.items() if config.r > limit[0]}
    if not over:
        return
    everywhere = len(over) == len(layers)
    # all over: the largest limit is the useful maximum of the whole model; else the tightest module, as an example
    pick = max if everywhere else min
    name, (limit, why, in_features, out_features) = pick(over.items(), key=lambda item: item[1][0])
    where = "every adapted module" if everywhere else f"{len(over)} of {len(layers)} adapted modules"
    # stacklevel 3: _warn_useless_rank <- adapt <- the caller
    warnings.warn(
        f"r={config.r} exceeds the useful maximum of {config.method} on {where} ({'at most' if everywhere else 'e.g.'} "
        f"{limit} on {name}, {in_features} -> {out_features}: {why}); r beyond it adds parameters but no rank"
        + (f"; use r <= {limit}" if everywhere else ""),
        stacklevel=3,
    )


def build_layers(
    model: nn.Module, config: AdapterConfig, *, initialize: bool = True, fingerprints: dict | None = None
) -> dict[str, AdapterLayer]:
    """Check `config` against the model and create (not yet install) one adapter layer per target.

    `fingerprints` ({name: Fingerprint}) spares re-fingerprinting weights the caller has just checked.
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError("config must be a lorakit.AdapterConfig")
    if any(True for _ in adapter_layers(model)):
        raise ConfigError("the model is already adapted; call lorakit.unload(model) first or adapt a fresh model")
    layer_cls = METHODS[config.method]
    names = find_targets(model, config)
    for name in names:
        layer_cls.check_layer(config, name, *linear_shape(model.get_submodule(name)))
    fingerprints = fingerprints or {}
    shared = layer_cls.build_shared(model, config, names)
    return {
        name: layer_cls(
            model.get_submodule(name),
            config,
            name,
            initialize=initialize,
            fingerprint=fingerprints.get(name),
            shared=shared,
        )
        for name in names
    }


def shared_parameters(model: nn.Module) -> SharedParameters | None:
    """The model's shared adapter tensors (registered by `install`), or None."""
    shared = getattr(model, SHARED, None)
    return shared if isinstance(shared, SharedParameters) else None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every declared trained parameter of the adapters (each layer's and the shared ones), each once."""
    params = [p for _, layer in adapter_layers(model) for p in layer.trainable_parameters().values()]
    shared = shared_parameters(model)
    if shared is not None:
        params += list(shared.trainable_parameters().values())
    return params + [p for extra in EXTRAS for p in extra.trainable_parameters(model)]


def install(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Put the layers in place of their base modules; only their declared parameters stay trainable."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name, layer in layers.items():
        _set_module(model, name, layer)
        for param in layer.trainable_parameters().values():
            param.requires_grad_(True)
    shared = next((layer.shared for layer in layers.values() if layer.shared is not None), None)
    if shared is not None:
        model.add_module(SHARED, shared)
        for param in shared.trainable_parameters().values():
            param.requires_grad_(True)
    # transformers' Trainer saves and resumes through model.save_pretrained / load_state_dict: make those write and
    # read a lorakit adapter (never the base). Local import: integrations.hf imports persist, which imports inject.
    from .integrations.hf import install_trainer_hooks

    install_trainer_hooks(model)


def _remove_shared(model: nn.Module) -> None:
    if shared_parameters(model) is not None:
        delattr(model, SHARED)


def merge(model: nn.Module) -> nn.Module:
    """Fold s·ΔW into every base weight; refused if already merged. Inference then costs nothing extra.

    Modules trained in full (`modules_to_save`) stay as they are: their trained copies are already dense."""
    layers = _require_adapted(model)
    if any(layer.merged for _, layer in layers):
        raise ConfigError("the model is already merged; call lorakit.unmerge(model) before merging again")
    done = []
    try:
        for _, layer in layers:
            layer.merge()
            done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise
    return model


def unmerge(model: nn.Module) -> nn.Module:
    layers = _require_adapted(model)
    if not any(layer.merged for _, layer in layers):
        raise ConfigError("the model is not merged; nothing to unmerge")
    for _, layer in layers:
        if layer.merged:
            layer.unmerge()
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block the model computes exactly the ORIGINAL base model (OLoRA's init mutation undone too)."""
    layers = [layer for _, layer in _require_adapted(model)]
    remerge = [layer for layer in layers if layer.merged]
    previous = [layer.disabled for layer in layers]
    for layer in remerge:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    previous_extras = [extra.set_disabled(model, True) for extra in EXTRAS]
    try:
        yield model
    finally:
        for extra, was in zip(EXTRAS, previous_extras):
            extra.restore_disabled(model, was)
        for layer, was in zip(layers, previous):
            layer.disabled = was
        for layer in remerge:
            layer.merge()


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters and restore the original base weights; returns the (now plain) model."""
    for name, layer in _require_adapted(model):
        _set_module(model, name, layer.restore_base())
    _remove_shared(model)
    for extra in EXTRAS:
        extra.unload(model)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights and remove them: a plain model that computes the adapted one.

    A quantized base layer (4-bit, 8-bit) becomes a full-precision nn.Linear holding its dequantized weight plus
    s·ΔW: lorakit never re-quantizes a merged weight (that would add a rounding the adapter never saw)."""
    layers = _require_adapted(model)
    dense = {name: layer.dense_merged() for name, layer in layers if not layer.frozen.can_merge}
    if not dense and not all(layer.merged for _, layer in layers):
        merge(model)  # all or nothing
    for name, layer in layers:
        if name not in dense and not layer.merged:
            layer.merge()
    for name, layer in layers:
        _set_module(model, name, dense.get(name, layer.base_layer))
    _remove_shared(model)
    for extra in EXTRAS:  # the trained copies, the embedding with its trained rows written in
        extra.unload(model, keep_trained=True)
    return model


@dataclass
class Summary:
    method: str
    trainable: int
    total: int
    rows: list[tuple[str, int, int, int, int]]  # name, in, out, rank, trainable params

    def __str__(self) -> str:
        width = max([len("module")] + [len(r[0]) for r in self.rows])
        lines = [f"{'module':<{width}}  {'in':>6}  {'out':>6}  {'rank':>4}  {'trainable':>10}"]
        lines += [f"{n:<{width}}  {i:>6}  {o:>6}  {r:>4}  {t:>10,}" for n, i, o, r, t in self.rows]
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(
            f"method={self.method}  trainable params: {self.trainable:,} / {self.total:,} ({pct:.4f}%)  "
            f"in {sum(1 for row in self.rows if row[0] != SHARED_ROW)} modules"
        )
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Trainable / total parameter counts and a per-module table (frozen buffers are not parameters)."""
    layers = _require_adapted(model)
    rows = [
        (
            name,
            layer.in_features,
            layer.out_features,
            layer.r,
            sum(p.numel() for p in layer.trainable_parameters().values()),
        )
        for name, layer in layers
    ]
    shared = shared_parameters(model)
    if shared is not None:
        rows.append(
            (
                SHARED_ROW,
                0,
                0,
                layers[0][1].r,
                sum(p.numel() for p in shared.trainable_parameters().values()),
            )
        )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return Summary(layers[0][1].method, trainable, total, rows)
