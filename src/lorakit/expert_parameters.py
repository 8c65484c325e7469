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

LoRA on these parameters is `AdapterConfig(target_parameters=[...])`, in `lorakit.expert_lora`. What PEFT 0.21 does (peft/tuners/lora/layer.py, `ParamWrapper`), for whoever
adds it: one wrapper per targeted parameter, nested when a module has two (the last name of `target_parameters` is
the outer one, so its keys read `experts.lora_A.weight`, the earlier one's `experts.base_layer.lora_A.weight`); for
a parameter of shape (E, out, in) (`is_transposed` False, as in Mixtral and Qwen3-MoE) lora_A is (E·r x in) with
A_e = rows e·r … (e+1)·r, lora_B is (out x E·r) with B_e = lora_B.reshape(out, r, E)[:, :, e], ΔW_e = s·B_e A_e,
A Kaiming-uniform and B zero; no dropout, DoRA or bias. The forward reparametrizes the parameter as W + s·ΔW while
the module runs. lorakit does the same, as a model-wide extra beside the linear adapters (like modules_to_save),
so persist, disabled / unload / merge_and_unload and Trainer checkpoints handle it; PEFT export and import of it,
the training procedures, LoRA-RITE and FSDP refuse it in one line.
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
            named = [key for key in params if suffix_matches(f"{module}.{key}", target)]
            if named and not any(suffix_matches(n, target) for n in linear_names):
                shape = params[named[0]]
                dims = " x ".join(map(str, shape))
                what = f"the 3-D expert parameter {module}.{named[0]} ({shape[0]} experts, {dims}), not a linear layer"
                it = "it"
            elif suffix_matches(module, target):
                what = f"the experts module {module}, whose experts are 3-D parameters ({_describe(params)}), not linear layers"
                it = "them"
            else:
                continue
            raise ConfigError(
                f"target {target!r} is {what}: targets are linear layers; name {it} in target_parameters (CLI: "
                f"--target-parameters) for a LoRA per expert, and target linear modules such as {hint}"
            )


def warn_frozen_experts(model: nn.Module, targets, stacklevel: int, adapted: dict | None = None) -> None:
    """One warning when `targets` ("all-linear" or a regex) reach experts that stay frozen (`adapted`: the experts
    modules `target_parameters` adapts, {name: ExpertLoRA})."""
    found = expert_parameters(model)
    for name, module in (adapted or {}).items():  # their adapted parameters do not stay frozen
        left = {key: shape for key, shape in found.get(name, {}).items() if key not in module.params}
        found = {m: p for m, p in found.items() if m != name} | ({name: left} if left else {})
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


def suffix_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)
