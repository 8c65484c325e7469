"""Find target modules, wrap them in adapter layers, and the whole-model operations built on them."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import expert_lora, saved_modules, swap, token_rows
from .adapted import BASE_ROW_NAMES, AdaptedLayer
from .config import AdapterConfig
from .errors import ConfigError
from .expert_parameters import refuse_expert_targets, warn_frozen_experts
from .layer import AdapterLayer, SharedParameters, base_of, is_supported_layer, linear_shape
from .methods import METHODS
from .routing import install_routing, refresh_routing, remove_routing

SHARED = "lorakit_shared"  # the attribute of the model that owns a method's shared tensors (LoRTA)
SHARED_ROW = "(shared by all layers)"  # the summary row of those tensors
DEFAULT_ADAPTER = "default"  # the name of an adapter when none is given: today's one-adapter API and files
EXTRAS = (saved_modules, token_rows, expert_lora)  # trained beside the adapters: each has the same few functions


def hosts(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """(module name, host) of every adapted module."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def is_adapted(model: nn.Module) -> bool:
    return any(True for _ in hosts(model))


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added."""
    names: dict[str, None] = {}
    for _, host in hosts(model):
        names.update(dict.fromkeys(host.adapters))
    return list(names)


def _first_host(model: nn.Module) -> AdaptedLayer | None:
    return next((host for _, host in hosts(model)), None)


def active_adapters(model: nn.Module) -> list[str]:
    host = _first_host(model)
    return [] if host is None else list(host.active)


def trained_adapters(model: nn.Module) -> list[str]:
    host = _first_host(model)
    return [] if host is None else list(host.trained)


def current_adapter(model: nn.Module) -> str | None:
    """The adapter an unnamed call means: the only one, else the only one in training, else the only active one."""
    names = adapter_names(model)
    if len(names) <= 1:
        return names[0] if names else None
    for chosen in (trained_adapters(model), active_adapters(model)):
        if len(chosen) == 1:
            return chosen[0]
    raise ConfigError(
        f"the model has adapters {names} and none is the single active one; name the adapter "
        "(adapter=...) or lorakit.set_active(model, name)"
    )


def adapter_layers(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, AdapterLayer]]:
    """(module name, layer) of one adapter: `adapter`, or the one `current_adapter` means."""
    name = adapter if adapter is not None else current_adapter(model)
    if name is None:
        return
    for module_name, host in hosts(model):
        if name in host.adapters:
            yield module_name, host.adapters[name]


def _require_adapted(model: nn.Module, adapter: str | None = None) -> list[tuple[str, AdapterLayer]]:
    if not is_adapted(model):
        raise ConfigError("the model has no lorakit adapters; call lorakit.adapt(model, config) first")
    if adapter is not None and adapter not in adapter_names(model):
        raise ConfigError(f"the model has no adapter named {adapter!r}; its adapters: {adapter_names(model)}")
    return list(adapter_layers(model, adapter))


def shared_attribute(adapter: str) -> str:
    """Where the model keeps an adapter's shared tensors: `lorakit_shared` for the default one."""
    return SHARED if adapter == DEFAULT_ADAPTER else f"{SHARED}_{adapter}"


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
    modules = targetable_modules(model)
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
            refuse_expert_targets(model, config.targets, linear_names, _examples(linear_names))
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


def targetable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """named_modules, with an adapted module standing for its base layer (and its own children left out)."""
    modules = {}
    inside = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, AdaptedLayer):
            modules[name] = module.base_layer
            inside = name + "."
        else:
            modules[name] = module
    return modules


def _examples(names: list[str], count: int = 6) -> str:
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    shown = suffixes[:count] or ["(none)"]
    return ", ".join(shown) + (", ..." if len(suffixes) > count else "")


def adapt(model: nn.Module, config: AdapterConfig, *, name: str | None = None, initialize: bool = True) -> nn.Module:
    """Wrap the modules `config` targets in adapter layers, in place; freeze everything but the adapters.

    `name` names the adapter ("default" when omitted). The first adapter of a model is active and trains; one
    added to an adapted model (a new `name`) is idle until `set_active` selects it, as in PEFT's `add_adapter`.
    Every check runs before the model is touched, so a ConfigError leaves the model as it was.
    """
    name = new_adapter_name(model, name)
    layers = build_layers(model, config, initialize=initialize, name=name)
    _refuse_extras_beside(model, config)
    experts = expert_lora.build(model, config, initialize=initialize)
    warn_frozen_experts(model, config.targets, stacklevel=2, adapted=experts)
    saved = saved_modules.build(model, saved_modules.find_saved(model, config))
    rows = token_rows.build(model, config, list(layers), list(saved))
    _warn_useless_rank(config, layers)
    install(model, layers, name=name)
    saved_modules.install(model, saved)
    token_rows.install(model, rows)
    expert_lora.install(model, experts)
    return model


def _refuse_extras_beside(model: nn.Module, config: AdapterConfig) -> None:
    """modules_to_save and trainable token rows are model-wide: only a model's first adapter has them."""
    if is_adapted(model) and (config.modules_to_save or config.trainable_tokens or config.target_parameters):
        raise ConfigError(
            "modules_to_save, trainable_tokens and target_parameters belong to a model's first adapter only (they "
            "are model-wide); add this adapter without them, or adapt a fresh model"
        )


def new_adapter_name(model: nn.Module, name: str | None) -> str:
    existing = adapter_names(model)
    if name is None:
        if existing:
            raise ConfigError(
                f"the model is already adapted (adapter {existing[0]!r}); pass name=... to add another adapter, or "
                "call lorakit.unload(model) first"
            )
        return DEFAULT_ADAPTER
    if not isinstance(name, str) or not name.isidentifier() or name in BASE_ROW_NAMES:
        raise ConfigError(
            f"adapter name {name!r} is invalid; use a Python identifier such as 'task_a' (not {BASE_ROW_NAMES[0]!r} "
            f"or {BASE_ROW_NAMES[1]!r}, which mean the base model)"
        )
    if name in existing:
        raise ConfigError(
            f"the model already has an adapter named {name!r}; pick another name or lorakit.delete_adapter first"
        )
    return name


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
    model: nn.Module,
    config: AdapterConfig,
    *,
    initialize: bool = True,
    fingerprints: dict | None = None,
    name: str = DEFAULT_ADAPTER,
) -> dict[str, AdapterLayer]:
    """Check `config` against the model and create (not yet install) one adapter layer per target.

    `fingerprints` ({name: Fingerprint}) spares re-fingerprinting weights the caller has just checked.
    """
    if not isinstance(config, AdapterConfig):
        raise ConfigError("config must be a lorakit.AdapterConfig")
    if name in adapter_names(model):
        raise ConfigError(
            f"the model already has an adapter named {name!r}; pick another name or lorakit.delete_adapter first"
        )
    layer_cls = METHODS[config.method]
    names = find_targets(model, config)
    for target in names:
        layer_cls.check_layer(config, target, *linear_shape(base_of(model.get_submodule(target))))
    fingerprints = fingerprints or {}
    shared = layer_cls.build_shared(model, config, names)
    return {
        target: layer_cls(
            base_of(model.get_submodule(target)),
            config,
            target,
            initialize=initialize,
            fingerprint=fingerprints.get(target),
            shared=shared,
        )
        for target in names
    }


def shared_parameters(model: nn.Module, adapter: str | None = None) -> SharedParameters | None:
    """An adapter's shared tensors (registered by `install`), or None."""
    name = adapter if adapter is not None else current_adapter(model)
    shared = getattr(model, shared_attribute(name), None) if name is not None else None
    return shared if isinstance(shared, SharedParameters) else None


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    params = [p for _, layer in adapter_layers(model, adapter) for p in layer.trainable_parameters().values()]
    shared = shared_parameters(model, adapter)
    if shared is not None:
        params += list(shared.trainable_parameters().values())
    names = adapter_names(model)
    if names and adapter != names[0]:  # modules_to_save, token rows, expert LoRA: the model's first adapter's
        return params
    return params + [p for extra in EXTRAS for p in extra.trainable_parameters(model)]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every declared trained parameter of the adapters in training (each layer's and the shared ones), each once."""
    return [p for adapter in trained_adapters(model) for p in adapter_parameters(model, adapter)]


def install(model: nn.Module, layers: dict[str, AdapterLayer], *, name: str = DEFAULT_ADAPTER) -> None:
    """Put the layers in place as adapter `name` (hosts created where a module has none yet). The model's first
    adapter becomes active and trains; only the declared parameters of adapters in training stay trainable."""
    first = not is_adapted(model)
    for target, layer in layers.items():
        module = model.get_submodule(target)
        if not isinstance(module, AdaptedLayer):
            module = AdaptedLayer(module)
            swap.set_module(model, target, module)
        module.add(name, layer)
    shared = next((layer.shared for layer in layers.values() if layer.shared is not None), None)
    if shared is not None:
        model.add_module(shared_attribute(name), shared)
    if first:
        for param in model.parameters():
            param.requires_grad_(False)
        _set_state(model, (name,), (name,))
    else:
        _set_state(model, active_adapters(model), trained_adapters(model))
    # transformers' Trainer saves and resumes through model.save_pretrained / load_state_dict: make those write and
    # read a lorakit adapter (never the base). Local import: integrations.hf imports persist, which imports inject.
    from .integrations.hf import install_trainer_hooks

    install_trainer_hooks(model)
    install_routing(model)


def _set_state(model: nn.Module, active, trained) -> None:
    """Record which adapters are active and which train on every host; only the latter's parameters get grads."""
    active, trained = tuple(active), tuple(trained)
    for _, host in hosts(model):
        host.active, host.trained = active, trained
    for adapter in adapter_names(model):
        for param in adapter_parameters(model, adapter):
            param.requires_grad_(adapter in trained)
    refresh_routing(model)


def set_active(model: nn.Module, adapters: str | list[str] | None, *, train: str | list[str] | None = ...) -> nn.Module:
    """Select the adapters the model runs: one name, a list (their updates add up, in order), or None (the base).

    `train` names the active adapters whose parameters train (default: all of them); the others stay frozen, for
    training one adapter on top of others. As in PEFT's `set_adapter`.
    """
    names = _names(model, adapters)
    trained = names if train is ... else _names(model, train)
    idle = [name for name in trained if name not in names]
    if idle:
        raise ConfigError(f"train={idle[0]!r} is not among the active adapters {names}; activate it first")
    merged = [name for name in adapter_names(model) for _, layer in adapter_layers(model, name) if layer.merged]
    if merged and tuple(names) != tuple(active_adapters(model)):
        raise ConfigError(f"adapter {merged[0]!r} is merged; call lorakit.unmerge(model) before changing adapters")
    _set_state(model, names, trained)
    return model


def _names(model: nn.Module, adapters) -> list[str]:
    if not is_adapted(model):
        raise ConfigError("the model has no lorakit adapters; call lorakit.adapt(model, config) first")
    if adapters is None:
        return []
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    existing = adapter_names(model)
    unknown = [name for name in names if name not in existing]
    if unknown:
        raise ConfigError(f"the model has no adapter named {unknown[0]!r}; its adapters: {existing}")
    if len(set(names)) != len(names):
        raise ConfigError(f"adapters {names} name one adapter twice; name each once")
    return names


def delete_adapter(model: nn.Module, adapter: str) -> nn.Module:
    """Remove one adapter (not the model's last: `lorakit.unload` removes them all)."""
    _require_adapted(model, adapter)
    if len(adapter_names(model)) == 1:
        raise ConfigError(f"{adapter!r} is the model's only adapter; call lorakit.unload(model) to remove it")
    if any(layer.merged for _, layer in adapter_layers(model, adapter)):
        raise ConfigError(f"adapter {adapter!r} is merged; call lorakit.unmerge(model) before deleting it")
    active = [name for name in active_adapters(model) if name != adapter]
    trained = [name for name in trained_adapters(model) if name != adapter]
    for target, host in list(hosts(model)):
        if adapter in host.adapters:
            host.remove(adapter)
            host.__dict__.pop("_route_stacks", None)
        if not host.adapters:
            swap.set_module(model, target, host.base_layer)
    if shared_parameters(model, adapter) is not None:
        delattr(model, shared_attribute(adapter))
    _set_state(model, active, trained)
    return model


@dataclass
class AdapterInfo:
    name: str
    method: str
    r: int
    parameters: int  # trained parameters (each layer's and the shared ones)
    modules: int
    active: bool


def adapters(model: nn.Module) -> list[AdapterInfo]:
    """Each adapter of the model: name, method, rank, parameter count, modules, whether active."""
    infos = []
    active = active_adapters(model)
    for name in adapter_names(model):
        layers = [layer for _, layer in adapter_layers(model, name)]
        parameters = sum(p.numel() for p in adapter_parameters(model, name))
        infos.append(AdapterInfo(name, layers[0].method, layers[0].config.r, parameters, len(layers), name in active))
    return infos


def _remove_shared(model: nn.Module) -> None:
    for adapter in adapter_names(model):
        if shared_parameters(model, adapter) is not None:
            delattr(model, shared_attribute(adapter))


def _merge_targets(model: nn.Module, adapter: str | None) -> list[str]:
    """The adapters a merge means: `adapter`, or every active one."""
    _require_adapted(model, adapter)
    names = [adapter] if adapter is not None else active_adapters(model)
    if not names:
        raise ConfigError("no adapter is active, so there is nothing to merge; name one: merge(model, adapter=...)")
    return names


def merge(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Fold s·ΔW of `adapter` (default: every active adapter) into the base weights; refused if already merged.
    Inference then costs nothing extra. Modules trained in full (`modules_to_save`) stay as they are: their
    trained copies are already dense."""
    layers = [layer for name in _merge_targets(model, adapter) for _, layer in adapter_layers(model, name)]
    if any(layer.merged for layer in layers):
        raise ConfigError("the model is already merged; call lorakit.unmerge(model) before merging again")
    _merge_all(layers)
    return model


def _merge_all(layers: list[AdapterLayer]) -> None:
    """Merge every layer, or none: a failure unmerges the ones already merged."""
    done = []
    try:
        for layer in layers:
            layer.merge()
            done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise


def _merged_layers(model: nn.Module) -> list[AdapterLayer]:
    return [layer for _, host in hosts(model) for layer in host.adapters.values() if layer.merged]


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter's s·ΔW again."""
    _require_adapted(model)
    merged = _merged_layers(model)
    if not merged:
        raise ConfigError("the model is not merged; nothing to unmerge")
    for layer in merged:
        layer.unmerge()
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block the model computes exactly the ORIGINAL base model (OLoRA's init mutation undone too)."""
    _require_adapted(model)
    all_hosts = [host for _, host in hosts(model)]
    remerge = _merged_layers(model)
    previous = [host.disabled for host in all_hosts]
    for layer in remerge:
        layer.unmerge()
    for host in all_hosts:
        host.disabled = True
    previous_extras = [extra.set_disabled(model, True) for extra in EXTRAS]
    try:
        yield model
    finally:
        for extra, was in zip(EXTRAS, previous_extras):
            extra.restore_disabled(model, was)
        for host, was in zip(all_hosts, previous):
            host.disabled = was
        for layer in remerge:
            layer.merge()


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and restore the original base weights; returns the (now plain) model."""
    _require_adapted(model)
    _remove_shared(model)
    for name, host in list(hosts(model)):
        swap.set_module(model, name, host.restore_base())
    remove_routing(model)
    for extra in EXTRAS:
        extra.unload(model)
    return model


def merge_and_unload(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Fold `adapter` (default: every active adapter) into the base weights and remove all adapters: a plain model
    that computes the adapted one.

    A quantized base layer (4-bit, 8-bit) becomes a full-precision nn.Linear holding its dequantized weight plus
    s·ΔW: lorakit never re-quantizes a merged weight (that would add a rounding the adapter never saw)."""
    names = _merge_targets(model, adapter)
    stray = [layer.adapter_name for layer in _merged_layers(model) if layer.adapter_name not in names]
    if stray:
        raise ConfigError(f"adapter {stray[0]!r} is merged but not being kept; call lorakit.unmerge(model) first")
    chosen = {target: [host.adapters[n] for n in names if n in host.adapters] for target, host in hosts(model)}
    dense = {}
    for target, layers in chosen.items():
        if layers and not layers[0].frozen.can_merge:
            linear = layers[0].dense_merged()
            with torch.no_grad():
                for other in layers[1:]:
                    linear.weight += other.total_delta_linear().to(linear.weight.dtype)
            dense[target] = linear
    pending = [layer for target, layers in chosen.items() if target not in dense for layer in layers]
    _merge_all([layer for layer in pending if not layer.merged])
    _remove_shared(model)
    for target, host in list(hosts(model)):
        swap.set_module(model, target, dense.get(target, host.base_layer))
    remove_routing(model)
    for extra in EXTRAS:  # the trained copies, the embedding with its trained rows written in
        extra.unload(model, keep_trained=True)
    return model


@dataclass
class Summary:
    method: str
    trainable: int
    total: int
    rows: list[tuple[str, int, int, int, int]]  # name, in, out, rank, trainable params
    modules: int | None = None  # adapted modules (default: the rows but the shared one)

    def __str__(self) -> str:
        width = max([len("module")] + [len(r[0]) for r in self.rows])
        lines = [f"{'module':<{width}}  {'in':>6}  {'out':>6}  {'rank':>4}  {'trainable':>10}"]
        lines += [f"{n:<{width}}  {i:>6}  {o:>6}  {r:>4}  {t:>10,}" for n, i, o, r, t in self.rows]
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(
            f"method={self.method}  trainable params: {self.trainable:,} / {self.total:,} ({pct:.4f}%)  "
            f"in {self.modules if self.modules is not None else sum(1 for row in self.rows if row[0] != SHARED_ROW)} "
            "modules"
        )
        return "\n".join(lines)


def summary(model: nn.Module, adapter: str | None = None) -> Summary:
    """Trainable / total parameter counts and a per-module table of one adapter (frozen buffers are not
    parameters)."""
    layers = _require_adapted(model, adapter)
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
    shared = shared_parameters(model, layers[0][1].adapter_name)
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
    if layers[0][1].adapter_name == adapter_names(model)[0]:  # modules_to_save and token rows: the first adapter's
        rows += _extra_rows(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return Summary(layers[0][1].method, trainable, total, rows, modules=len(layers))


def _extra_rows(model: nn.Module) -> list[tuple[str, int, int, int, int]]:
    """Summary rows of the modules trained in full and of the trained token rows (in, out and rank 0: not low
    rank). A head tied to the embedding has no rows of its own (0 trainable)."""
    rows = []
    for name, module in saved_modules.saved_modules(model):
        count = sum(p.numel() for p in module.trainable_parameters().values())
        rows.append((f"{name} (trained in full)", 0, 0, 0, count))
    for name, module in token_rows.token_rows(model):
        count = sum(p.numel() for p in module.trainable_parameters().values())
        rows.append((f"{name} ({len(module.ids)} token rows)", 0, 0, 0, count))
    for name, module in expert_lora.expert_loras(model):
        count = sum(p.numel() for p in module.trainable_parameters().values())
        rows.append((f"{name} ({', '.join(module.params)}: LoRA per expert)", 0, 0, module.r, count))
    return rows
