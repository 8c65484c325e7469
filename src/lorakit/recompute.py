"""The adapters' inputs recomputed in backward instead of kept: the activation memory a LoRA step adds to the
frozen model's, cut without checkpointing whole blocks.

A LoRA update s·B·A·x needs x for A's gradient (∂L/∂A = s·(Bᵀ·∂L/∂y)·xᵀ), so autograd keeps every adapted layer's
input until the backward pass. The frozen model alone keeps none of them: a frozen linear's input gradient needs
only W. On a Llama block that is four extra activations per token: the two norm outputs (the input of q/k/v and of
gate/up), the attention output (o_proj's input) and the MLP product act(gate)·up (down_proj's input, the widest).
Two kinds of them are cheap to make again from tensors the graph keeps anyway:

- a norm's output (`*RMSNorm`, `*LayerNorm`, `nn.LayerNorm`): norm(h), where h, the residual stream, is kept by the
  norm's own backward;
- a product a·b (autograd's `MulBackward0`): both factors are kept by the product's own backward.

While `recompute_adapter_inputs(model)` is on, each adapted layer runs under `torch.autograd.graph.saved_tensors_hooks`
whose pack step replaces such a tensor (or a view of it) by its recipe, and whose unpack step, in backward, runs the
recipe again under no_grad and returns the same view. The recomputation is the same deterministic kernel on the
same inputs, so values and gradients are bit-identical to the run without it (tested). A recipe is used only while
its tensor is alive and unchanged since it was made (version counters), and its inputs are checked again before it
runs: a changed input raises, as autograd does for a tensor modified in place. What it costs: one norm per block and
one elementwise product per MLP, again, in backward.

Not used under gradient checkpointing (each block is recomputed whole there, with its own hooks) nor under FSDP (a
norm's weight is a shard outside its forward). `lorakit train` turns it on otherwise.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

NORM_SUFFIXES = ("RMSNorm", "LayerNorm")
PRUNE_AT = 4096  # registry entries: dead ones are dropped past this many


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(NORM_SUFFIXES)


@dataclass
class _Entry:
    """A tensor made by a recipe, held weakly: `make(*sources)` gives it again."""

    tensor: weakref.ref
    version: int
    make: object
    sources: tuple  # weak references to the recipe's inputs
    source_versions: tuple
    autocast: tuple  # (device type, enabled, dtype) when it was made: the recomputation runs under the same


@dataclass
class _Recipe:
    """What a packed tensor becomes: a view (size, stride, offset into the made tensor) of make(*sources)."""

    make: object
    sources: tuple
    source_versions: tuple
    autocast: tuple
    dtype: torch.dtype
    shape: torch.Size
    size: torch.Size
    stride: tuple
    offset: int


def _key(tensor: torch.Tensor):
    """(device, storage address), or None for a tensor without a plain storage (torchao's NF4 weight, a subclass)."""
    try:
        return tensor.device, tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class InputRecompute:
    """The hooks of `recompute_adapter_inputs`: norm outputs and products registered as they are made, and each
    adapted layer's saved tensors packed through the registry."""

    def __init__(self, model: nn.Module, hosts: list[nn.Module]):
        self.entries: dict = {}
        self.handles = []
        for module in model.modules():
            if is_norm(module):
                self.handles.append(module.register_forward_hook(self._norm_made))
        for host in hosts:
            self.handles.append(host.register_forward_pre_hook(self._enter))
            self.handles.append(host.register_forward_hook(self._exit, always_call=True))
        self.contexts = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.entries = [], {}

    # ---- the registry
    def _register(self, tensor: torch.Tensor, make, sources: tuple) -> None:
        if not tensor.is_contiguous() or tensor.storage_offset() != 0 or tensor.numel() == 0:
            return  # the recipe makes a fresh contiguous tensor: only a tensor laid out the same can be replaced
        key = _key(tensor)
        if key is None or type(tensor) is not torch.Tensor:
            return
        if len(self.entries) > PRUNE_AT:
            self.entries = {key: e for key, e in self.entries.items() if e.tensor() is not None}
        kind = tensor.device.type
        autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        self.entries[key] = _Entry(weakref.ref(tensor), tensor._version, make,
                                            tuple(weakref.ref(s) for s in sources),
                                            tuple(s._version for s in sources), autocast)  # fmt: skip

    def _norm_made(self, module, args, output) -> None:
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad and len(args) == 1:
            source = args[0]
            if isinstance(source, torch.Tensor):
                self._register(output, module, (source,))

    # ---- an adapted layer's forward
    def _enter(self, host, args) -> None:
        x = args[0] if args else None
        node = getattr(x, "grad_fn", None) if isinstance(x, torch.Tensor) else None
        if node is not None and type(node).__name__ == "MulBackward0" and torch.is_grad_enabled():
            try:
                a, b = node._saved_self, node._saved_other
            except RuntimeError:
                a = b = None
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                self._register(x, torch.mul, (a, b))
        context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        context.__enter__()
        self.contexts.append(context)

    def _exit(self, host, args, output) -> None:
        if self.contexts:
            self.contexts.pop().__exit__(None, None, None)

    def _pack(self, tensor: torch.Tensor):
        key = _key(tensor) if type(tensor) is torch.Tensor else None
        entry = None if key is None else self.entries.get(key)
        if entry is None:
            return tensor
        made = entry.tensor()
        sources = tuple(ref() for ref in entry.sources)
        if (made is None or made._version != entry.version or made.dtype != tensor.dtype
                or any(s is None for s in sources)
                or tuple(s._version for s in sources) != entry.source_versions):  # fmt: skip
            return tensor
        return _Recipe(entry.make, sources, entry.source_versions, entry.autocast, made.dtype, made.shape,
                       tensor.size(), tensor.stride(), tensor.storage_offset())  # fmt: skip

    @staticmethod
    def _unpack(packed):
        if not isinstance(packed, _Recipe):
            return packed
        if tuple(s._version for s in packed.sources) != packed.source_versions:
            raise RuntimeError(  # autograd raises for the same tensor too: the norm and the product saved it
                "a tensor needed for gradient computation was modified in place after the forward (an input that "
                "lorakit.recompute_adapter_inputs recomputes from)"
            )
        kind, enabled, dtype = packed.autocast
        with torch.no_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            made = packed.make(*packed.sources)
        if made.dtype != packed.dtype or made.shape != packed.shape:
            raise RuntimeError(f"lorakit.recompute_adapter_inputs made a {made.dtype} {tuple(made.shape)} tensor again "
                               f"where the forward made {packed.dtype} {tuple(packed.shape)}; please report this")  # fmt: skip
        return made.as_strided(packed.size, packed.stride, packed.offset)


def recompute_adapter_inputs(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn the recomputation of the adapters' norm and product inputs on (or off) for `model`, adapted already
    (the adapted layers present now are the ones covered); returns it."""
    from .inject import hosts

    current = getattr(model, "_lorakit_recompute", None)
    if current is not None:
        current.remove()
        model._lorakit_recompute = None
    if enabled:
        model._lorakit_recompute = InputRecompute(model, [host for _, host in hosts(model)])
    return model
