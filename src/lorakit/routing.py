"""A mixed batch: each row of a batch uses its own adapter, or none, in one forward pass.

    y_i = base(x_i) + B_{a(i)} A_{a(i)} x_i          (B_a A_a = s_a·ΔW_a, from `AdapterLayer.route_factors`)

The batched formulation of Punica's BGMV (Chen et al., arXiv:2310.18547) and S-LoRA (Sheng et al.,
arXiv:2311.03285), in plain torch: every adapter's factors of a layer are stacked once, zero-padded to the largest
rank, with slot 0 all zeros for the rows that use the base; a row gathers its slot, and two batched products
(`torch.bmm`) add every row's update. With few tokens (decode) gathering copies the factors once per row, which
costs more than the products: there every token goes through every adapter's A in one GEMM, the result is masked
to its row's adapter, and one `addmm` with every B adds into the base output (`DENSE_LIMIT`). No Python loop over
adapters or rows. PEFT's `adapter_names` instead runs each adapter on its sub-batch in turn. At decode a layer
costs reading every adapter's factors plus a fixed cost per operation, so the per-layer Python is kept short: the
model lists its hosts once (`refresh_routing`, when adapters are added or deleted) instead of scanning its modules
on every forward, and a cached stack is checked against its tensors with one flat comprehension.

LoRA-Mini adapters that share their frozen outer matrices (same seed and `mini_outer`, so the same A_out, B_out)
are stacked by their inner factors only: A_out·x is computed once for all rows, then the per-row r x a and b x r
products, then B_out once, so sixteen of them cost about what one costs.

A method whose update is not low rank (MoRA's rotation / compression) has no factors: its rows run its own
forward on their sub-batch, the one case with a loop (over those adapters only).

Entry points: `model(input_ids, adapter_names=[...])` (a forward pre-hook of the adapted model takes the names out
of the call), `model.generate(..., adapter_names=[...])` (the adapted model's `generate` routes every step), and
`with lorakit.mixed_batch(model, names):` around any other call. "base" and PEFT's "__base__" name a row without an
adapter. Inference only: a model in training mode refuses, as PEFT does.

Stacks are cached per layer and rebuilt when an adapter's tensors change (their version counters), so serving
pays for them once; a hot swap (`lorakit.hotswap_adapter`) writes in place and is picked up the same way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError

# Up to this many (token, slot) pairs a layer multiplies every row by every slot's factors and masks (two plain
# GEMMs, no gathered copies: decode); above it, each row gathers its own slot for two batched products (prefill).
DENSE_LIMIT = 4096


@dataclass
class Routing:
    """The adapter name of each row, for one forward pass of the model (set by `lorakit.inject`'s pre-hook)."""

    rows: tuple[str, ...]
    slots: dict = field(default_factory=dict)  # (adapter names of a layer) -> row slot index tensor, per device
    names: dict = field(default_factory=dict)  # (a layer's adapters) -> the names of this batch it has
    masks: dict = field(default_factory=dict)  # slot masks of the dense (few-token) product

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

    def token_mask(self, names: tuple[str, ...], rank: int, tokens: int, device, dtype) -> torch.Tensor:
        """tokens x (adapters·rank): 1 where a column belongs to the adapter of the token's row (a base row: all
        zeros). Rows hold tokens // rows tokens each, in order."""
        key = (names, rank, tokens, device, dtype)
        mask = self.masks.get(key)
        if mask is None:
            index = self.slot_index(names, device).repeat_interleave(tokens // len(self.rows))
            columns = torch.arange(1, len(names) + 1, device=device).repeat_interleave(rank)
            mask = self.masks[key] = (index[:, None] == columns[None, :]).to(dtype)
        return mask

    def slot_index(self, names: tuple[str, ...], device) -> torch.Tensor:
        key = (names, str(device))
        index = self.slots.get(key)
        if index is None:
            slot = {name: i + 1 for i, name in enumerate(names)}
            index = torch.tensor([slot.get(row, 0) for row in self.rows], device=device)
            self.slots[key] = index
        return index


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
def _stack(layers, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot 0 zeros, slot i the i-th pair (a: r_i x n, b: m x r_i), zero-padded to the largest rank."""
    rank = max(a.shape[0] for a, _ in pairs)
    a0, b0 = pairs[0]
    stacked_a = a0.new_zeros(len(pairs) + 1, rank, a0.shape[1])
    stacked_b = b0.new_zeros(len(pairs) + 1, b0.shape[0], rank)
    for i, (a, b) in enumerate(pairs, start=1):
        stacked_a[i, : a.shape[0]] = a
        stacked_b[i, :, : b.shape[1]] = b
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
        self.a, self.b = _stack(layers, [(a.detach(), b.detach()) for a, b in pairs]) if self.low_rank else (None, None)
        if self.low_rank:  # the adapters' stacks side by side, without slot 0: (adapters·rank) x in, out x (...)
            self.rank = self.a.shape[1]
            self.a_flat = self.a[1:].reshape(-1, self.a.shape[-1])
            self.b_flat = self.b[1:].permute(1, 0, 2).reshape(self.b.shape[1], -1)


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
    if not stacks.low_rank:
        return _per_adapter(host, x, out, names, routing.slot_index(names, x.device))
    tokens = x.numel() // x.shape[-1]
    if tokens * len(names) <= DENSE_LIMIT:
        return _dense(x, out, stacks, routing.token_mask(names, stacks.rank, tokens, x.device, stacks.a.dtype))
    index = routing.slot_index(names, x.device)
    h = x.reshape(x.shape[0], -1, x.shape[-1]).to(stacks.a.dtype)
    if stacks.outer is not None:
        h = h @ stacks.outer[0].T  # A_out·x once for every row
    update = torch.bmm(torch.bmm(h, stacks.a[index].transpose(1, 2)), stacks.b[index].transpose(1, 2))
    if stacks.outer is not None:
        update = update @ stacks.outer[1].T
    return out + update.reshape(out.shape).to(out.dtype)


def _dense(x, out, stacks: _Stacks, mask: torch.Tensor) -> torch.Tensor:
    """Few tokens (decode): every token through every adapter's A in one GEMM, masked to its row's adapter, then one
    GEMM with every B that adds into the base output. No gathered copies of the factors, and few operations: at
    decode a layer's time is reading the factors plus each operation's fixed cost, not its arithmetic."""
    h = x.reshape(-1, x.shape[-1])
    if h.dtype != stacks.a.dtype:
        h = h.to(stacks.a.dtype)
    if stacks.outer is not None:
        h = h @ stacks.outer[0].T  # A_out·x once for every token
    low = h @ stacks.a_flat.T
    low *= mask
    last = stacks.b_flat
    if stacks.outer is not None:  # the inner B's, then B_out once for every token
        low, last = low @ stacks.b_flat.T, stacks.outer[1]
    flat_out = out.reshape(-1, out.shape[-1])
    if flat_out.dtype == low.dtype:
        return torch.addmm(flat_out, low, last.T).reshape(out.shape)
    return (flat_out + (low @ last.T).to(out.dtype)).reshape(out.shape)


def _per_adapter(host, x, out, names, index) -> torch.Tensor:
    """Rows of adapters without low-rank factors: each adapter's own forward on its sub-batch."""
    out = out.clone()
    for slot, name in enumerate(names, start=1):
        rows = (index == slot).nonzero().flatten()
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
