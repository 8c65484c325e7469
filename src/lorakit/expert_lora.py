"""LoRA on the 3-D expert parameters of mixture-of-experts layers: `AdapterConfig(target_parameters=[...])`, PEFT's
`target_parameters` (LoraConfig, PEFT 0.21).

    W'_e = W_e + s·B_e·A_e        for every expert e,   A_e: r x in (Kaiming-uniform), B_e: out x r (zero)

transformers 5 keeps a layer's experts as stacked parameters, e.g. `experts.gate_up_proj` (E x 2·intermediate x
hidden) and `experts.down_proj` (E x hidden x intermediate), which its forward indexes as `F.linear(x, W[e])`
(`lorakit.expert_parameters`). There is no linear layer per expert to wrap, so `ExpertLoRA` wraps the experts
module: its forward runs the module's own forward (its routing and kernels unchanged) with each targeted parameter
replaced, for the call, by W + s·ΔW (`torch.func.functional_call`), and autograd reaches A and B through it. That is
what PEFT does (`ParamWrapper`, peft/tuners/lora/layer.py): the update is the same and so is its cost, one
dense (E, out, in) copy per targeted parameter per call. s = alpha/r (alpha/√r with rslora), as for LoRA.

Tensors: A (E, r, in) and B (E, out, r) per parameter. PEFT's layout of the same factors, for the oracle tests and
whoever exports them: lora_A = A.reshape(E·r, in) and lora_B = B.permute(1, 2, 0).reshape(out, r·E)
(B_e = lora_B.reshape(out, r, E)[:, :, e]).

Like `modules_to_save` it is model-wide, so it belongs to the model's first adapter: it follows `disabled()` (the
original parameters), `unload()` (the original module back, untouched), `merge_and_unload()` (W + s·ΔW written into
the parameter), the adapter file (each parameter's fingerprint, checked on load as for the linear layers) and
Trainer checkpoints. `merge()` leaves it applied as it is: there is no separate base to fold into while the adapter
stays.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from . import swap
from .config import AdapterConfig
from .errors import APPLY_ANYWAY, AdapterFileError, BaseModelMismatchError, ConfigError
from .expert_parameters import expert_parameters, suffix_matches
from .fingerprint import DIFFERENT, Fingerprint
from .random import down_projection, generator

FILE_KEY = "target_parameters"  # the adapter.json section, and the prefix of the tensors in adapter.safetensors


class ExpertLoRA(nn.Module):
    """An experts module (`original`, frozen) with a rank-r LoRA per expert on each of `params`."""

    def __init__(self, original: nn.Module, name: str, params: list[str], r: int, scale: float,
                 fingerprints: dict[str, Fingerprint] | None = None):  # fmt: skip
        super().__init__()
        self.original = original.requires_grad_(False)
        self.name = name
        self.params = list(params)
        self.r, self.scale = r, scale
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for key in self.params:
            weight = getattr(original, key)
            experts, out, inp = weight.shape
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            self.A[key] = nn.Parameter(torch.zeros(experts, r, inp, dtype=dtype, device=weight.device))
            self.B[key] = nn.Parameter(torch.zeros(experts, out, r, dtype=dtype, device=weight.device))
        self.base_fingerprints = fingerprints or {key: Fingerprint.of(getattr(original, key)) for key in self.params}
        self.disabled = False

    def initialize(self, seed: int, init: str = "kaiming") -> None:
        """A as LoRA's (Kaiming-uniform, a=√5: U(±1/√in), or N(0, 1/r²) for "gaussian"), each parameter from its
        own generator (lorakit.random); B zero, so the output is unchanged at init."""
        with torch.no_grad():
            for key in self.params:
                experts, r, inp = self.A[key].shape
                draw = down_projection(init, experts * r, inp, generator(seed, f"{self.name}.{key}", "A"))
                self.A[key].copy_(draw.reshape(experts, r, inp))
                self.B[key].zero_()

    def delta(self, key: str) -> torch.Tensor:
        """s·B_e·A_e for every expert: (E, out, in)."""
        return self.scale * torch.bmm(self.B[key], self.A[key])

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.original(*args, **kwargs)
        replaced = {key: getattr(self.original, key) + self.delta(key).to(getattr(self.original, key).dtype)
                    for key in self.params}  # fmt: skip
        return functional_call(self.original, replaced, args, kwargs, strict=False)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{key}.{factor}": getattr(self, factor)[key] for key in self.params for factor in ("A", "B")}

    @torch.no_grad()
    def write_delta(self) -> nn.Module:
        """The original module with W + s·ΔW written into its parameters (merge_and_unload)."""
        for key in self.params:
            weight = getattr(self.original, key)
            weight.add_(self.delta(key).to(weight.dtype))
        return self.original


def expert_loras(model: nn.Module) -> Iterator[tuple[str, ExpertLoRA]]:
    for name, module in model.named_modules():
        if isinstance(module, ExpertLoRA):
            yield name, module


def find(model: nn.Module, config: AdapterConfig) -> dict[str, list[str]]:
    """{experts module: [its parameters]} that `config.target_parameters` names (suffixes of "module.parameter",
    at a dot boundary). A name matching no 3-D expert parameter is refused in one line."""
    if not config.target_parameters:
        return {}
    if config.method != "lora":
        raise ConfigError(
            f"target_parameters is LoRA's (as in PEFT); method={config.method!r} adapts linear layers only: use "
            "method='lora' or drop target_parameters"
        )
    found = expert_parameters(model)
    chosen: dict[str, list[str]] = {}
    for target in config.target_parameters:
        hits = [(module, key) for module, params in found.items() for key in params
                if suffix_matches(f"{module}.{key}", target)]  # fmt: skip
        if not hits:
            examples = sorted({f"{module.rsplit('.', 1)[-1]}.{key}" for module, params in found.items() for key in params})
            raise ConfigError(
                f"target_parameters {target!r} matches no 3-D expert parameter; "
                + (f"this model has: {', '.join(examples[:4])}" if examples else "this model has none")
            )
        for module, key in hits:
            chosen.setdefault(module, [])
            if key not in chosen[module]:
                chosen[module].append(key)
    return chosen


def build(model: nn.Module, config: AdapterConfig, *, initialize: bool = True) -> dict[str, ExpertLoRA]:
    """One `ExpertLoRA` per experts module `config.target_parameters` reaches (not yet installed)."""
    modules = {}
    for name, params in find(model, config).items():
        module = ExpertLoRA(model.get_submodule(name), name, params, config.r, config.scale)
        if initialize:
            module.initialize(config.seed, config.init)
        modules[name] = module
    return modules


def unload(model: nn.Module, *, keep_trained: bool = False) -> None:
    """Put each original back (`keep_trained`: with W + s·ΔW written in, as `merge_and_unload` does)."""
    for name, module in list(expert_loras(model)):
        swap.set_module(model, name, module.write_delta() if keep_trained else module.original)


# the EXTRAS interface shared with the other wrappers (lorakit.swap)
install, set_disabled, restore_disabled, trainable_parameters = swap.functions_for(expert_loras)


# ----------------------------------------------------------------- the adapter file
def to_file(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors "target_parameters.<module>.<parameter>.A|B", the adapter.json section)."""
    tensors, info = {}, {}
    for name, module in expert_loras(model):
        stored = {key: value.detach().to("cpu").contiguous() for key, value in module.trainable_parameters().items()}
        tensors.update({f"{FILE_KEY}.{name}.{key}": value for key, value in stored.items()})
        info[name] = {
            "parameters": module.params,
            "r": module.r,
            "scale": module.scale,
            "tensors": {key: list(value.shape) for key, value in stored.items()},
            "base_fingerprints": {key: fp.to_json() for key, fp in module.base_fingerprints.items()},
        }
    return tensors, info


def validate(info, fail) -> None:
    if info is None:
        return
    if not isinstance(info, dict) or not info:
        fail(f"'{FILE_KEY}' must be an object of experts modules")
    for name, entry in info.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            fail(f"{FILE_KEY} entry {name!r} lacks 'tensors'")
        params = entry.get("parameters")
        if not isinstance(params, list) or not params or not all(isinstance(p, str) for p in params):
            fail(f"{FILE_KEY} entry {name!r} needs a list of 'parameters'")
        if set(entry["tensors"]) != {f"{p}.{factor}" for p in params for factor in ("A", "B")}:
            fail(f"{FILE_KEY} entry {name!r} needs an A and a B tensor per parameter")
        rank, scale = entry.get("r"), entry.get("scale")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            fail(f"{FILE_KEY} entry {name!r} field 'r' must be a positive integer")
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale):
            fail(f"{FILE_KEY} entry {name!r} field 'scale' must be a number")
        fingerprints = entry.get("base_fingerprints")
        if not isinstance(fingerprints, dict) or set(fingerprints) != set(params):
            fail(f"{FILE_KEY} entry {name!r} needs one base fingerprint per parameter")
        for key, shape in entry["tensors"].items():
            if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)):
                fail(f"{FILE_KEY} entry {name!r} tensor {key!r} has an invalid shape")
        for key, fingerprint in fingerprints.items():
            try:
                Fingerprint.from_json(fingerprint)
            except (ValueError, TypeError) as exc:
                fail(f"{FILE_KEY} entry {name!r} has an invalid base fingerprint for {key!r} ({exc})")


def file_shapes(info: dict | None) -> dict[str, tuple[int, ...]]:
    return {
        f"{FILE_KEY}.{name}.{key}": tuple(shape)
        for name, entry in (info or {}).items()
        for key, shape in entry["tensors"].items()
    }


def from_file(model: nn.Module, info: dict | None, tensors: dict, *, strict: bool = True) -> dict[str, ExpertLoRA]:
    """Check each experts module against the file (shapes, fingerprints) and build (not install) its LoRA."""
    if not info:
        return {}
    found = expert_parameters(model)
    different, modules = [], {}
    for name, entry in info.items():
        params = found.get(name, {})
        fits = all(
            key in params and [params[key][0], entry["r"], params[key][2]] == entry["tensors"][f"{key}.A"]
            and [params[key][0], params[key][1], entry["r"]] == entry["tensors"][f"{key}.B"]
            for key in entry["parameters"]
        )
        if not fits:
            raise BaseModelMismatchError(
                f"base model has no experts module {name!r} with the expert parameters the adapter's "
                "target_parameters hold",
                "load the adapter onto the base model it was trained on",
            )
        original = model.get_submodule(name)
        saved = {key: Fingerprint.from_json(fp) for key, fp in entry["base_fingerprints"].items()}
        if any(saved[key].compare(Fingerprint.of(getattr(original, key)))[0] == DIFFERENT for key in saved):
            different.append(name)
        module = ExpertLoRA(original, name, entry["parameters"], entry["r"], float(entry["scale"]), saved)
        with torch.no_grad():
            for key, param in module.trainable_parameters().items():
                param.copy_(tensors[f"{FILE_KEY}.{name}.{key}"])
        modules[name] = module
    if different:
        message = (
            f"base module {different[0]} has different expert weights than the adapter was trained on "
            f"({len(different)} of {len(info)} experts modules differ)"
        )
        if strict:
            raise BaseModelMismatchError(message, f"load it onto the same base model, {APPLY_ANYWAY}")
        warnings.warn(f"{message}; applying it anyway", stacklevel=3)
    return modules


def load_into(model: nn.Module, tensors: dict) -> None:
    """Copy a file's (checked) tensors into the model's existing expert LoRAs (resuming a Trainer run)."""
    for name, module in expert_loras(model):
        with torch.no_grad():
            for key, param in module.trainable_parameters().items():
                param.copy_(tensors[f"{FILE_KEY}.{name}.{key}"])


# ----------------------------------------------------------------- PEFT's format
# PEFT (peft/tuners/tuners_utils.py, `_inject_parameters`) wraps a module once per targeted parameter, in the order
# of the module's own `named_parameters(recurse=False)`: the first is innermost, so in the file the last one's factors
# are "<module>.lora_A.weight", the one before "<module>.base_layer.lora_A.weight", and so on. Its pattern key for
# rank_pattern / alpha_pattern is "<module>.<parameter>".
def peft_order(original: nn.Module, params: list[str]) -> list[str]:
    """`params` in the order PEFT nests their wrappers (innermost first)."""
    return [key for key, _ in original.named_parameters(recurse=False) if key in params]


def peft_key(name: str, order: list[str], key: str, factor: str) -> str:
    """The file key (without "base_model.model.") of `factor` ("lora_A" / "lora_B") of parameter `key`."""
    return f"{name}.{'base_layer.' * (len(order) - 1 - order.index(key))}{factor}.weight"


def to_peft(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """(PEFT's tensors of every expert LoRA, {"<module>.<parameter>": (r, scale)}).
    lora_A = A.reshape(E·r, in), lora_B = B.permute(1, 2, 0).reshape(out, r·E)."""
    tensors, shapes = {}, {}
    for name, module in expert_loras(model):
        order = peft_order(module.original, module.params)
        for key in order:
            a, b = module.A[key].detach(), module.B[key].detach()
            tensors[peft_key(name, order, key, "lora_A")] = a.reshape(-1, a.shape[-1])
            tensors[peft_key(name, order, key, "lora_B")] = b.permute(1, 2, 0).reshape(b.shape[1], -1)
            shapes[f"{name}.{key}"] = (module.r, module.scale)
    return tensors, shapes


def from_peft(model: nn.Module, target_parameters: list[str], take, shape_of) -> dict[str, ExpertLoRA]:
    """Build (not install) the expert LoRAs of a PEFT file. `take(key)` pops a file tensor (None if absent);
    `shape_of("<module>.<parameter>")` gives PEFT's (r, scale) for it. Raises AdapterFileError naming what is wrong."""
    config = AdapterConfig(method="lora", r=1, targets=["unused"], target_parameters=target_parameters)
    try:
        chosen = find(model, config)
    except ConfigError as exc:
        raise AdapterFileError(str(exc)) from None
    modules = {}
    for name, params in chosen.items():
        original = model.get_submodule(name)
        order = peft_order(original, params)
        ranks = {shape_of(f"{name}.{key}") for key in order}
        if len(ranks) > 1:
            raise AdapterFileError(f"{name}: its expert parameters have different ranks or alphas {sorted(ranks)}; "
                                   "lorakit gives one experts module one rank: re-train it with one")  # fmt: skip
        (r, scale), = ranks
        module = ExpertLoRA(original, name, order, r, scale)
        for key in order:
            weight = getattr(original, key)
            experts, out, inp = weight.shape
            a, b = take(peft_key(name, order, key, "lora_A")), take(peft_key(name, order, key, "lora_B"))
            if a is None or b is None or tuple(a.shape) != (experts * r, inp) or tuple(b.shape) != (out, r * experts):
                raise AdapterFileError(
                    f"{name}.{key} needs lora_A {(experts * r, inp)} and lora_B {(out, r * experts)} for rank {r} "
                    "per expert; the file " + ("lacks them" if a is None or b is None else
                                               f"has {tuple(a.shape)} and {tuple(b.shape)}")  # fmt: skip
                )
            with torch.no_grad():
                module.A[key].copy_(a.reshape(experts, r, inp))
                module.B[key].copy_(b.reshape(out, r, experts).permute(2, 0, 1))
        modules[name] = module
    return modules
