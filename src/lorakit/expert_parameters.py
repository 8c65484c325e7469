"""Mixture-of-experts layers whose experts are 3-D parameters, not linear modules: found and reported, not adapted.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ... in one module per layer (e.g.
`MixtralExperts`) holding two stacked parameters, `gate_up_proj` (experts x 2·intermediate x hidden) and
`down_proj` (experts x hidden x intermediate), which its forward indexes per expert (`F.linear(x, W[e])`). There is
no `nn.Linear` to wrap, so lorakit's methods, which wrap linear layers, cannot adapt them; on such a model they
adapt the attention (and any other linear layer). PEFT 0.21 adapts such a parameter with `target_parameters`: per
expert e a LoRA ΔW_e = B_e A_e, applied by reparametrizing the parameter as W + s·ΔW while the module runs.

So that nothing is skipped without saying: targets that name an expert parameter or its module are refused in one
line naming it, and `targets="all-linear"` (or a regex reaching an experts module) warns that the experts stay
frozen. A 3-D parameter counts as a stack of experts when its module has `num_experts` equal to its first dimension
(every transformers experts class has it); convolution kernels, also 3-D, are not experts.

Not done: LoRA on these parameters. What PEFT 0.21 does (peft/tuners/lora/layer.py, `ParamWrapper`), for whoever
adds it: one wrapper per targeted parameter, nested when a module has two (the last name of `target_parameters` is
the outer one, so its keys read `experts.lora_A.weight`, the earlier one's `experts.base_layer.lora_A.weight`); for
a parameter of shape (E, out, in) (`is_transposed` False, as in Mixtral and Qwen3-MoE) lora_A is (E·r x in) with
A_e = rows e·r … (e+1)·r, lora_B is (out x E·r) with B_e = lora_B.reshape(out, r, E)[:, :, e], ΔW_e = s·B_e A_e,
A Kaiming-uniform and B zero; no dropout, DoRA or bias. The forward reparametrizes the parameter as W + s·ΔW while
the module runs. In lorakit such a wrapper is not a linear `AdapterLayer`: persist (base check, stored shapes,
rebuild on load), PEFT export and import, the procedures, LoRA-RITE and FSDP all read adapted layers as linear
ones, and each would need it handled or refused.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

from .errors import ConfigError


def expert_parameters(model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """{experts module name: {parameter name: shape}} of the model's 3-D expert parameters."""
    found = {}
    for name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if not isinstance(experts, int) or isinstance(module, nn.modules.conv._ConvNd):
            continue
        params = {
            key: tuple(param.shape)
            for key, param in module.named_parameters(recurse=False)
            if param.ndim == 3 and param.shape[0] == experts
        }
        if params:
            found[name] = params
    return found


def _describe(params: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{key} {' x '.join(map(str, shape))}" for key, shape in params.items())


def refuse_expert_targets(model: nn.Module, targets: list[str], linear_names: list[str], hint: str) -> None:
    """ConfigError if a target suffix names an experts module, or one of its 3-D parameters and no linear layer."""
    for module, params in expert_parameters(model).items():
        for target in targets:
            named = [key for key in params if _suffix(f"{module}.{key}", target)]
            if named and not any(_suffix(n, target) for n in linear_names):
                shape = params[named[0]]
                dims = " x ".join(map(str, shape))
                what = f"the 3-D expert parameter {module}.{named[0]} ({shape[0]} experts, {dims}), not a linear layer"
                it = "it"
            elif _suffix(module, target):
                what = f"the experts module {module}, whose experts are 3-D parameters ({_describe(params)}), not linear layers"
                it = "them"
            else:
                continue
            raise ConfigError(
                f"target {target!r} is {what}: lorakit cannot adapt {it}; target linear modules such as {hint}"
            )


def warn_frozen_experts(model: nn.Module, targets, stacklevel: int) -> None:
    """One warning when `targets` ("all-linear" or a regex) reach experts that stay frozen."""
    found = expert_parameters(model)
    if isinstance(targets, str) and targets != "all-linear":
        found = {m: p for m, p in found.items() if re.fullmatch(targets, m) or any(
            re.fullmatch(targets, f"{m}.{key}") for key in p)}
    elif not isinstance(targets, str):
        return
    if not found:
        return
    module, params = next(iter(found.items()))
    count = sum(len(p) for p in found.values())
    warnings.warn(
        f"targets={targets!r} adapts linear layers only: the {count} 3-D expert parameters of {len(found)} "
        f"mixture-of-experts modules (e.g. {module}: {_describe(params)}) are not linear layers and stay frozen",
        stacklevel=stacklevel + 1,
    )


def _suffix(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)
