"""A mixed batch: each row of a batch uses its own adapter, or none, in one forward pass.

    y_i = base(x_i) + B_{a(i)} A_{a(i)} x_i          (B_a A_a = s_a·ΔW_a, from `AdapterLayer.route_factors`)

The segmented formulation of Punica's SGMV (Chen et al., arXiv:2310.18547) and S-LoRA (Sheng et al.,
arXiv:2311.03285), in plain torch. Every adapter's factors of a layer are stacked once, zero-padded to the largest
rank: A as N x in x r, B as N x r x out. The rows of the batch are grouped by adapter, as m rows per adapter
(m: the most rows any adapter has; a group with fewer is padded with zero rows, and rows of the base are left out),
and two batched products (`torch.bmm`, batched over the adapters) give every group's update, which is added
into its rows of the base output (`index_add_`). Each adapter's factors are read once per layer, however many rows
use it, and nothing is copied per row: at decode (16 rows x 1 token, 16 adapters) a layer's time is reading the
factors, and this reads each byte once. No Python loop over adapters or rows. PEFT's `adapter_names` instead runs
each adapter on its sub-batch in turn.

When the groups are very uneven (one adapter with most rows, several with one), padding would multiply the
arithmetic; with many tokens (prefill) that costs more than copying factors, so there (`PADDING_LIMIT`,
`FEW_TOKENS`) each row gathers its own adapter's factors instead and one batched product runs per row (BGMV).

The two were measured on SmolLM2-135M's 210 layer shapes at decode with 16 adapters (2 cores, fp32): 24 ms for the
grouped products, against 79 ms for the formulation this replaced (every token through every adapter's A in one
GEMM, masked to its row's adapter: 16 times the arithmetic, and small-M GEMMs run far from the memory bandwidth).

LoRA-Mini adapters that share their frozen outer matrices (same seed and `mini_outer`, so the same A_out, B_out)
are stacked by their inner factors only: A_out·x is computed once for all rows, then the grouped r x a and b x r
products, then B_out once, so sixteen of them cost about what one costs.

A method whose update is not low rank (MoRA's rotation / compression) has no factors: its rows run its own
forward on their sub-batch, the one case with a loop (over those adapters only).

Entry points: `model(input_ids, adapter_names=[...])` (a forward pre-hook of the adapted model takes the names out
of the call), `model.generate(..., adapter_names=[...])` (the adapted model's `generate` routes every step), and
`with lorakit.mixed_batch(model, names):` around any other call. "base" and PEFT's "__base__" name a row without an
adapter. Inference only: a model in training mode refuses, as PEFT does.

Stacks are cached per layer and rebuilt when an adapter's tensors change (their version counters), so serving
pays for them once; a hot swap (`lorakit.hotswap_adapter`) writes in place and is picked up the same way. The
model lists its hosts once (`refresh_routing`, when adapters are added or deleted) instead of scanning its modules
on every forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError

# Grouped products pad every adapter's group to the largest one. They are used unless padding would more than
# double the rows multiplied while each group holds more than FEW_TOKENS tokens (then arithmetic, not reading the
# factors, is the cost, and each row gathers its own factors instead).
PADDING_LIMIT = 2.0
FEW_TOKENS = 64


@dataclass(frozen=True)
class Groups:
    """The rows of a batch grouped by adapter, for one tuple of adapter names on one device."""

    count: int  # adapters (N)
    size: int  # rows per group (m), the largest group
    rows: torch.Tensor  # the rows with an adapter, group by group (K of them)
    places: torch.Tensor  # each of those rows' place in the N·m grouped rows
    slots: torch.Tensor  # each row's adapter, 1..N (0: the base), in batch order
    adapters: torch.Tensor  # the adapter (0..N-1) of each of `rows`, for the gathered product
    padded: bool  # some group is short of `size` rows
    in_order: bool  # every row has an adapter and the groups are the batch's rows in order: nothing to reorder


@dataclass
class Routing:
    """The adapter name of each row, for one forward pass of the model (set by `lorakit.inject`'s pre-hook)."""

    rows: tuple[str, ...]
    groups_by_names: dict = field(default_factory=dict)  # (adapter names of a layer, device) -> Groups
    names: dict = field(default_factory=dict)  # (a layer's adapters) -> the names of this batch it has

    def names_on(self, adapters: dict) -> tuple[str, ...]:
        """The adapters of this batch that a host has (`adapters`: its name -> layer dict), in first-row order
        (checked unmerged once per forward)."""
        key = tuple(adapters)
        names = self.names.get(key)
        if names is None:
            names = tuple(name for name in dict.fromkeys(self.rows) if name in adapters)
            merged = [name for name in names if adapters[name].merged]
            if merged:
                raise ConfigError(f"adapter {merged[0]!r} is merged; call lorakit.unmerge(model) before a mixed batch")
            self.names[key] = names
        return names

    def groups(self, names: tuple[str, ...], device) -> Groups:
        key = (names, str(device))
        groups = self.groups_by_names.get(key)
        if groups is None:
            slot = {name: i + 1 for i, name in enumerate(names)}
            slots = [slot.get(row, 0) for row in self.rows]
            members = [[i for i, s in enumerate(slots) if s == k] for k in range(1, len(names) + 1)]
            size = max(len(m) for m in members)
            rows = [i for m in members for i in m]
            places = [k * size + j for k, m in enumerate(members) for j in range(len(m))]
            groups = self.groups_by_names[key] = Groups(
                len(names), size, torch.tensor(rows, device=device), torch.tensor(places, device=device),
                torch.tensor(slots, device=device), torch.tensor([slots[i] - 1 for i in rows], device=device),
                padded=len(rows) != len(names) * size,
                in_order=rows == list(range(len(self.rows))),
            )
        return groups


def _watched(layers) -> list[tuple[dict, str, torch.Tensor]]:
    """Every tensor of the adapters, with the dict that holds it (an adapter has no child modules with tensors:
    its dropout has none)."""
    return [
        (tensors, key, t)
        for layer in layers
        for tensors in (layer._parameters, layer._buffers)
        for key, t in tensors.items()
        if t is not None
    ]


def _versions(watched) -> list:
    """Changes when a tensor is replaced (`layer.A = ...`), given new storage (`.data = ...`) or written in place
    (its version counter). Runs on every layer of every forward, so a flat comprehension."""
    return [(t.data_ptr(), t._version) if tensors.get(key) is t else None for tensors, key, t in watched]


def _shared_outer(layers) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A_out, B_out) when every layer is LoRA-Mini with the same outer matrices and no frozen links, else None."""
    first = layers[0]
    if first.method != "mini" or first.frozen_links is not None:
        return None
    for layer in layers[1:]:
        if layer.method != "mini" or layer.frozen_links is not None:
            return None
        same = layer.A_out is first.A_out or (
            layer.A_out.shape == first.A_out.shape
            and layer.B_out.shape == first.B_out.shape
            and torch.equal(layer.A_out, first.A_out)
            and torch.equal(layer.B_out, first.B_out)
        )
        if not same:
            return None
    return first.A_out, first.B_out


@torch.no_grad()
def _stack(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """N x in x r and N x r x out from the pairs (a: r_i x in, b: out x r_i), zero-padded to the largest rank: the
    layouts `torch.bmm` reads without a transpose."""
    rank = max(a.shape[0] for a, _ in pairs)
    a0, b0 = pairs[0]
    stacked_a = a0.new_zeros(len(pairs), a0.shape[1], rank)
    stacked_b = b0.new_zeros(len(pairs), rank, b0.shape[0])
    for i, (a, b) in enumerate(pairs):
        stacked_a[i, :, : a.shape[0]] = a.T
        stacked_b[i, : b.shape[1]] = b.T
    return stacked_a, stacked_b


class _Stacks:
    """One layer's cached stacks for one tuple of adapter names."""

    def __init__(self, layers):
        self.layers = layers
        self.watched = _watched(layers)
        self.key = _versions(self.watched)
        outer = _shared_outer(layers)
        if outer is not None:  # Mini with shared outer matrices: stack the inner factors only
            self.outer = outer
            pairs = [(layer.A_in.detach(), (layer.B_in * layer.scale).detach()) for layer in layers]
        else:
            self.outer = None
            pairs = [layer.route_factors() for layer in layers]
        self.low_rank = all(pair is not None for pair in pairs)
        self.a, self.b = _stack([(a.detach(), b.detach()) for a, b in pairs]) if self.low_rank else (None, None)


def _stacks(host, names: tuple[str, ...]) -> _Stacks:
    adapters = _adapter_dict(host)
    layers = [adapters[name] for name in names]
    cache = host.__dict__.setdefault("_route_stacks", {})
    cached = cache.get(names)
    if cached is None or cached.layers != layers or cached.key != _versions(cached.watched):
        cached = cache[names] = _Stacks(layers)
    return cached


def _adapter_dict(host) -> dict:
    """The host's adapters by name: its ModuleDict's own dict (read on every layer of every forward, where
    nn.Module attribute lookups add up)."""
    return host._modules["adapters"]._modules


def routed_forward(host, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The host layer's output for a mixed batch (see the module docstring)."""
    rows = routing.rows
    if x.shape[0] != len(rows):
        raise ConfigError(
            f"adapter_names has {len(rows)} names but a layer got {x.shape[0]} rows; pass one name per row of the "
            "batch (generate: without beams or several sequences per prompt)"
        )
    out = host.base_output(x)
    names = routing.names_on(_adapter_dict(host))
    if not names:
        return out
    stacks = _stacks(host, names)
    groups = routing.groups(names, x.device)
    if not stacks.low_rank:
        return _per_adapter(host, x, out, names, groups.slots)
    per_row = x.reshape(len(rows), -1, x.shape[-1])
    if per_row.dtype != stacks.a.dtype:
        per_row = per_row.to(stacks.a.dtype)
    picked = per_row if groups.in_order else per_row.index_select(0, groups.rows)  # the rows with an adapter
    if stacks.outer is not None:
        picked = picked @ stacks.outer[0].T  # LoRA-Mini's shared A_out·x, once for every row
    update = (_grouped if use_groups(groups, per_row.shape[1]) else _gathered)(picked, stacks, groups)
    if stacks.outer is not None:
        update = update @ stacks.outer[1].T  # and its shared B_out, once for every row
    by_row = out.reshape(len(rows), per_row.shape[1], out.shape[-1])
    update = update.to(out.dtype)
    if out.requires_grad:  # out of place, so autograd keeps the base output
        summed = by_row + update if groups.in_order else by_row.index_add(0, groups.rows, update)
    else:
        summed = by_row.add_(update) if groups.in_order else by_row.index_add_(0, groups.rows, update)
    return summed.reshape(out.shape)


def use_groups(groups: Groups, tokens: int) -> bool:
    """The grouped products (see PADDING_LIMIT), or else each row's gathered factors."""
    return groups.count * groups.size <= PADDING_LIMIT * len(groups.rows) or groups.size * tokens <= FEW_TOKENS


def _grouped(picked: torch.Tensor, stacks: _Stacks, groups: Groups) -> torch.Tensor:
    """The update of each row with an adapter (`picked`: those rows, in `groups.rows` order; K x tokens x out): the
    rows grouped by adapter, zero rows where a group is short, through two batched products, one slice of the
    stacks per group."""
    tokens = picked.shape[1]
    if groups.padded:
        grouped = picked.new_zeros(groups.count * groups.size, tokens, picked.shape[-1])
        grouped.index_copy_(0, groups.places, picked)
    else:
        grouped = picked
    grouped = grouped.reshape(groups.count, groups.size * tokens, -1)
    update = torch.bmm(torch.bmm(grouped, stacks.a), stacks.b)
    update = update.reshape(groups.count * groups.size, tokens, -1)
    return update.index_select(0, groups.places) if groups.padded else update


def _gathered(picked: torch.Tensor, stacks: _Stacks, groups: Groups) -> torch.Tensor:
    """The same update with each row's own copy of its adapter's factors (one batched product per row): for uneven
    groups of many tokens, where padding the groups would cost more arithmetic than the copies."""
    return torch.bmm(torch.bmm(picked, stacks.a[groups.adapters]), stacks.b[groups.adapters])


def _per_adapter(host, x, out, names, slots) -> torch.Tensor:
    """Rows of adapters without low-rank factors: each adapter's own forward on its sub-batch."""
    out = out.clone()
    for slot, name in enumerate(names, start=1):
        rows = (slots == slot).nonzero().flatten()
        if len(rows):
            out[rows] = host.adapters[name](x[rows], out[rows])
    return out


ROUTING_HOOKS = "_lorakit_routing_hooks"  # where the adapted model keeps its pre-hook, post-hook and generate
STICKY = "_lorakit_sticky_routing"  # a routing that holds across forwards (generate, `mixed_batch`)
SWITCH = "_lorakit_routing_switch"  # the model's `_Switch`


def _routing(model: nn.Module, names) -> Routing:
    from .adapted import BASE_ROW_NAMES

    if model.training:
        raise ConfigError("adapter_names is for inference (a mixed batch); call model.eval() first")
    if isinstance(names, str):
        raise ConfigError("adapter_names must be a list with one adapter name per row, not a string")
    rows = tuple(names)
    known = list(_known_names(model))
    unknown = sorted({row for row in rows if row not in BASE_ROW_NAMES} - set(known))
    if unknown:
        raise ConfigError(
            f"adapter_names has {unknown[0]!r}, which is not an adapter of the model ({known}); use one of those "
            "or 'base'"
        )
    return Routing(rows)


class _Switch:
    """The adapted model's hosts and adapter names, listed when they change (`refresh_routing`), so that a forward
    sets every host's routing without scanning the model's modules (a scan costs more than a decode step's
    adapters)."""

    def __init__(self):
        self.hosts: list = []
        self.names: tuple[str, ...] = ()


def refresh_routing(model: nn.Module) -> None:
    """List the model's hosts and adapter names again (after an adapter is added or deleted)."""
    switch = model.__dict__.get(SWITCH)
    if switch is None:
        return
    from .inject import adapter_names, hosts

    switch.hosts = [host for _, host in hosts(model)]
    switch.names = tuple(adapter_names(model))


def _known_names(model: nn.Module) -> tuple[str, ...]:
    switch = model.__dict__.get(SWITCH)
    if switch is not None:
        return switch.names
    from .inject import adapter_names

    return tuple(adapter_names(model))


def _set(model: nn.Module, routing: Routing | None) -> None:
    switch = model.__dict__.get(SWITCH)
    if switch is None:
        from .inject import hosts

        targets = [host for _, host in hosts(model)]
    else:
        targets = switch.hosts
    for host in targets:
        host.__dict__["routing"] = routing  # a plain attribute of the host: skip nn.Module's __setattr__ checks


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names):
    """Inside the block, row i of every forward of `model` uses adapter `adapter_names[i]` ("base": none)."""
    routing = _routing(model, adapter_names)
    previous = model.__dict__.get(STICKY)
    model.__dict__[STICKY] = routing
    try:
        yield model
    finally:
        model.__dict__[STICKY] = previous
        _set(model, None)


def _before_forward(model, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    routing = _routing(model, names) if names is not None else model.__dict__.get(STICKY)
    _set(model, routing)
    return args, kwargs


def _after_forward(model, args, output):
    _set(model, None)
    return output


class _RoutedGenerate:
    """The adapted model's `generate`: takes `adapter_names` and routes every step's forward."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, adapter_names=None, **kwargs):
        generate = type(self.model).generate.__get__(self.model)
        if adapter_names is None:
            return generate(*args, **kwargs)
        with mixed_batch(self.model, adapter_names):
            return generate(*args, **kwargs)

    def __reduce__(self):
        return (_RoutedGenerate, (self.model,))


def install_routing(model: nn.Module) -> None:
    """Give an adapted model its `adapter_names=` argument (forward and generate); idempotent."""
    if ROUTING_HOOKS in model.__dict__:
        refresh_routing(model)
        return
    model.__dict__[SWITCH] = _Switch()
    refresh_routing(model)
    patched = callable(getattr(type(model), "generate", None))
    if patched:
        object.__setattr__(model, "generate", _RoutedGenerate(model))
    model.__dict__[ROUTING_HOOKS] = (
        model.register_forward_pre_hook(_before_forward, with_kwargs=True),
        model.register_forward_hook(_after_forward),
        patched,
    )


def remove_routing(model: nn.Module) -> None:
    hooks = model.__dict__.pop(ROUTING_HOOKS, None)
    if hooks is None:
        return
    before, after, patched = hooks
    before.remove()
    after.remove()
    if patched:
        model.__dict__.pop("generate", None)
    model.__dict__.pop(STICKY, None)
    model.__dict__.pop(SWITCH, None)
