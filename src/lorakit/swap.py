"""Wrappers swapped into the module tree beside the adapters: what the EXTRAS (`saved_modules`, `token_rows`,
`expert_lora`) have in common.

Each extra replaces a module of the model by a wrapper that holds the original, a `disabled` flag (forward runs the
original while it is set) and `trainable_parameters()` ({name: Parameter}). These functions take the (name, wrapper)
pairs an extra finds in the model, so each extra keeps only what is its own: how it builds, stores and unloads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from torch import nn


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `model`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def install(model: nn.Module, wrappers: dict[str, nn.Module]) -> None:
    """Swap each wrapper in at its name; its trainable tensors require grad."""
    for name, wrapper in wrappers.items():
        set_module(model, name, wrapper)
        for param in wrapper.trainable_parameters().values():
            param.requires_grad_(True)


def set_disabled(found: Iterable[tuple[str, nn.Module]], disabled: bool) -> list[bool]:
    """Set every wrapper's `disabled`; returns the previous values, in the same order, for `restore_disabled`."""
    wrappers = [wrapper for _, wrapper in found]
    previous = [wrapper.disabled for wrapper in wrappers]
    for wrapper in wrappers:
        wrapper.disabled = disabled
    return previous


def restore_disabled(found: Iterable[tuple[str, nn.Module]], previous: list[bool]) -> None:
    for (_, wrapper), was in zip(found, previous):
        wrapper.disabled = was


def trainable_parameters(found: Iterable[tuple[str, nn.Module]]) -> list[nn.Parameter]:
    return [param for _, wrapper in found for param in wrapper.trainable_parameters().values()]


def functions_for(find: Callable[[nn.Module], Iterator[tuple[str, nn.Module]]]):
    """An extra's `install`, `set_disabled`, `restore_disabled` and `trainable_parameters` (model first), given
    its `find(model)` of (name, wrapper) pairs."""

    def set_disabled_in(model: nn.Module, disabled: bool) -> list[bool]:
        return set_disabled(find(model), disabled)

    def restore_disabled_in(model: nn.Module, previous: list[bool]) -> None:
        restore_disabled(find(model), previous)

    def trainable_parameters_in(model: nn.Module) -> list[nn.Parameter]:
        return trainable_parameters(find(model))

    return install, set_disabled_in, restore_disabled_in, trainable_parameters_in
