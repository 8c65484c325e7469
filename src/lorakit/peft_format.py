"""PEFT LoRA format, out and in: `adapter_config.json` + `adapter_model.safetensors`.

Export turns any lorakit adapter into a plain LoRA relative to the ORIGINAL base model, which
`peft.PeftModel.from_pretrained(base, dir)` loads and vLLM / TGI serve: LoRA as is; LoRA-Mini as A = A_in A_out,
B = B_out B_in; OLoRA as the rank-2r [B | −B0] [A ; A0] (see `AdapterLayer.export_factors`). lora_alpha is
set so that PEFT's scale equals lorakit's. Import reads a plain PEFT LoRA adapter (safetensors only: a pickled
`adapter_model.bin` is refused), with per-module ranks and alphas from rank_pattern / alpha_pattern, and refuses
the features lorakit cannot honour.

Inits that rewrite the base (`init_lora_weights`). OLoRA, PiSSA, CorDA and LoRA-GA start from factors (A0, B0) of
the base and write W − s·B0·A0 into it; an adapter saved without PEFT's conversion holds (A, B) relative to that
rewritten base, and `PeftModel.from_pretrained` redoes the init on the original base before loading them. Import
does the same where the init follows from the base alone:

- "olora": lorakit's OLoRA, whose (A0, B0) = (R[:r], Q[:, :r]) of W = QR are recomputed from the base:
  W x + s·(B A − B0 A0) x.
- "pissa" (Meng et al., arXiv:2404.02948): W = U Σ Vᵀ (dense SVD in float32, as PEFT), B0 = U_r (Σ_r/s)^½,
  A0 = (Σ_r/s)^½ V_rᵀ, so s·B0·A0 is the top-r part of W; imported as the exactly equal rank-2r LoRA
  [B | −B0] [A ; A0] (further training then trains all 2r ranks, and dropout also reaches the −B0 A0 path).
- refused, naming PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=...)`, which writes the
  plain LoRA: "pissa_niter_K" (a randomized SVD that PEFT redraws from the global random state at every load),
  "corda" (from activation statistics), "lora_ga" (from gradients), "olora" on Conv1D written by PEFT before 0.22
  (it factored the stored in × out weight; 0.22 factors the nn.Linear layout, as lorakit does, and imports);
  "loftq" (a quantized base) is refused too.
- True, False, "gaussian", "orthogonal", "eva" and "mica" leave the base alone: a plain LoRA.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from . import expert_lora, saved_modules, token_rows
from .atomic import prepare_directory, write_bytes, write_json
from .config import AdapterConfig
from .errors import AdapterFileError, ConfigError
from .inject import _require_adapted, build_layers, install, is_adapted
from .layer import is_supported_layer
from .persist import read_json

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TOKENS_DELTA = "token_adapter.trainable_tokens_delta"  # PEFT's tensor of a TrainableTokensWrapper (new row values)
SAVED_COPY = "modules_to_save.default."  # how PEFT names a saved module's copy inside the model (files omit it)


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short suffixes (vLLM wants these) when they select exactly `names`; the full names otherwise."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {
        n
        for n, m in model.named_modules()
        if is_supported_layer(m) or n in names
        if any(n == s or n.endswith("." + s) for s in suffixes)
    }
    return suffixes if selected == set(names) else sorted(names)


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


def export_peft(model: nn.Module, directory) -> Path:
    """Write the adapter as a PEFT LoRA adapter relative to the original base model; returns the directory."""
    layers = _require_adapted(model)
    config = layers[0][1].config
    tensors, shapes = {}, {}
    for name, layer in layers:
        factors = layer.export_factors()
        if factors is None:
            raise ConfigError(
                f"{layer.method} adapters are not low rank and cannot be exported as a PEFT LoRA; use "
                "`lorakit merge` to write a full merged model instead"
            )
        a, b = factors
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.to("cpu", torch.float32).contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.to("cpu", torch.float32).contiguous()
        rank = a.shape[0]  # PEFT's scale is alpha/r (alpha/sqrt(r) with rsLoRA): choose alpha to give ours
        shapes[name] = (rank, layer.scale * (math.sqrt(rank) if config.rslora else rank))
    expert_tensors, expert_shapes = expert_lora.to_peft(model)  # target_parameters: PEFT's nested layout
    tensors.update({PREFIX + key: value.to("cpu", torch.float32).contiguous() for key, value in expert_tensors.items()})
    for key, (rank, scale) in expert_shapes.items():
        shapes[key] = (rank, scale * (math.sqrt(rank) if config.rslora else rank))
    # the most common (rank, alpha) is the default; other modules (IncreLoRA, MoRA's sharing) get patterns
    rank, alpha = Counter(shapes.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): r for n, (r, _) in shapes.items() if r != rank}
    alpha_pattern = {re.escape(n): a for n, (_, a) in shapes.items() if a != alpha}
    fan_in_fan_out = {layer.fan_in_fan_out for _, layer in layers}
    names = [name for name, _ in layers]
    saved, token_indices = _export_extras(model, tensors)
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": config.rslora,
        "lora_dropout": config.dropout,
        "target_modules": _target_modules(model, names),
        "target_parameters": list(expert_shapes) or None,
        "fan_in_fan_out": fan_in_fan_out == {True},
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": saved or None,
        "trainable_token_indices": token_indices,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
    }
    if len(fan_in_fan_out) > 1:
        raise ConfigError(
            "export_peft: the model mixes nn.Linear and Conv1D adapters, which one PEFT config cannot express"
        )
    out = prepare_directory(directory)
    write_bytes(out / PEFT_WEIGHTS, save_safetensors(tensors, metadata={"format": "pt"}))
    write_json(out / PEFT_CONFIG, peft_config)
    return out


def _export_extras(model: nn.Module, tensors: dict) -> tuple[list[str], list | dict | None]:
    """Add the saved modules' copies and the token rows to `tensors` under PEFT's names; returns PEFT's
    (modules_to_save, trainable_token_indices). Full module names: PEFT matches them as suffixes, without a dot
    boundary, so a full name selects exactly that module."""
    saved = []
    for name, module in saved_modules.saved_modules(model):
        saved.append(name)
        for key, value in module.stored_tensors().items():
            tensors[f"{PREFIX}{name}.{key}"] = value.detach().to("cpu").contiguous()
    rows = dict(token_rows.token_rows(model))
    if not rows:
        return saved, None
    ids = next(iter(rows.values())).ids.tolist()
    for name, module in rows.items():
        if "rows" in module._parameters:
            if isinstance(module, token_rows.HeadRows) and module.base.bias is not None:
                raise ConfigError(
                    f"export_peft: the output head {name} has a bias, which PEFT's trainable tokens leave out; "
                    "train the head with modules_to_save instead"
                )
            tensors[f"{PREFIX}{name}.{TOKENS_DELTA}"] = module.rows.detach().to("cpu").contiguous()
    tied = any(getattr(module, "tied_to", None) is not None for module in rows.values())
    if tied or len(rows) == 1:  # the embedding (PEFT ties the head to it itself)
        return saved, ids
    return saved, {name: ids for name in rows}


REFUSED = {
    "use_dora": (True, "DoRA"),
    "use_qalora": (True, "QA-LoRA"),
    "lora_bias": (True, "lora_bias"),
}


def _read_peft(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(directory)
    config_path = path / PEFT_CONFIG
    if not config_path.is_file():
        raise AdapterFileError(f"{config_path} not found; pass a directory saved by PEFT's save_pretrained")
    peft_config = read_json(config_path, "re-save the adapter with PEFT's save_pretrained")
    if not isinstance(peft_config, dict) or peft_config.get("peft_type") != "LORA":
        kind = peft_config.get("peft_type") if isinstance(peft_config, dict) else None
        raise AdapterFileError(f"{config_path}: peft_type is {kind!r}; lorakit imports LoRA adapters only")
    weights = path / PEFT_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise AdapterFileError(
                f"{path} holds adapter_model.bin, a pickle file lorakit never loads; re-save it with PEFT "
                "(save_pretrained(..., safe_serialization=True)) to get adapter_model.safetensors"
            )
        raise AdapterFileError(f"{weights} not found; the PEFT adapter is incomplete")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise AdapterFileError(f"{weights} is not a valid safetensors file ({exc})") from None
    return peft_config, tensors


def _refuse_unsupported(peft_config: dict, where) -> None:
    for key, (bad, feature) in REFUSED.items():
        if peft_config.get(key) == bad:
            raise AdapterFileError(f"{where}: {feature} adapters are not supported by lorakit; use PEFT for this one")
    saved = peft_config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(n, str) and n for n in saved)):
        raise AdapterFileError(f"{where}: modules_to_save must be a list of module names; re-save it with PEFT")
    if peft_config.get("bias", "none") != "none":
        raise AdapterFileError(
            f"{where}: bias={peft_config['bias']!r} (trained biases) is not supported; only bias='none'"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = peft_config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in pattern.values()
        ):
            raise AdapterFileError(f"{where}: {key} must map module patterns to positive numbers; re-save it with PEFT")
    targets = peft_config.get("target_parameters")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)):
        raise AdapterFileError(f"{where}: target_parameters must be a list of parameter names; re-save it with PEFT")
    for key in ("layer_replication", "megatron_config", "loftq_config"):
        if peft_config.get(key):
            raise AdapterFileError(f"{where}: {key} is not supported by lorakit")


PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva", "mica")
CONVERT = (
    "re-save it with PEFT as a plain LoRA: save_pretrained(out, path_initial_model_for_weight_conversion=<the "
    "adapter saved before training>)"
)
UNREBUILDABLE = {  # init prefix -> why its rewritten base cannot be rebuilt from the base alone
    "pissa_niter_": "its base was rewritten by a randomized SVD that PEFT redraws at every load",
    "corda": "its base was rewritten from activations of calibration data",
    "lora_ga": "its base was rewritten from gradients on training data",
}


def peft_version(peft_config: dict) -> tuple[int, ...]:
    """The PEFT release that wrote the file ("0.22.0", "0.23.0.dev0" -> (0, 22, 0), (0, 23, 0)); (0,) when it is
    not recorded (PEFT writes it since 0.18)."""
    parts = []
    for part in str(peft_config.get("peft_version") or "").split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts) or (0,)


def _init_kind(peft_config: dict, where, fan_in_fan_out: bool) -> str:
    """"lora", "olora" or "pissa": how the adapter's init_lora_weights is rebuilt; the others are refused."""
    init = peft_config.get("init_lora_weights", True)
    if init in PLAIN_INITS and (isinstance(init, bool) or isinstance(init, str)):
        return "lora"
    if not isinstance(init, str):
        raise AdapterFileError(f"{where}: init_lora_weights={init!r} is not one PEFT knows; re-save it with PEFT")
    text = f"{where}: init_lora_weights={init!r}"
    if init.lower() == "olora":
        if fan_in_fan_out and peft_version(peft_config) < (0, 22):
            raise AdapterFileError(
                f"{text} on Conv1D (fan_in_fan_out) from PEFT {peft_config.get('peft_version') or 'before 0.18'}: "
                f"PEFT before 0.22 factored the stored in x out weight, which lorakit does not reproduce; {CONVERT}"
            )
        return "olora"
    if init == "pissa":
        return "pissa"
    if init == "loftq":
        raise AdapterFileError(
            f"{text}: its base was replaced by quantized weights that lorakit does not reproduce; use PEFT with the "
            "LoftQ base model"
        )
    for prefix, why in UNREBUILDABLE.items():
        if init.startswith(prefix):
            raise AdapterFileError(f"{text}: {why}, so lorakit cannot rebuild it; {CONVERT}")
    raise AdapterFileError(f"{text} is unknown to lorakit; {CONVERT}")


def pissa_start(weight_linear: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's initial (A0, B0) of W = U Σ Vᵀ (out × in, dense float32 SVD): A0 = (Σ_r/s)^½ V_rᵀ, B0 = U_r (Σ_r/s)^½,
    so that s·B0·A0 = U_r Σ_r V_rᵀ."""
    u, sigma, vh = torch.linalg.svd(weight_linear.detach().to(torch.float32), full_matrices=False)
    root = (sigma[:r] / scale).sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root


def pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (`peft.utils.other.get_pattern_key`): the first key that matches
    the end of the module name at a dot boundary, as the regex `(.*\\.)?(key)$`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def import_peft(model: nn.Module, directory) -> nn.Module:
    """Apply a PEFT LoRA adapter to `model` as a lorakit "lora" adapter ("olora" for init_lora_weights="olora"), in
    place; returns the model. Inits that rewrote the base are rebuilt or refused (module docstring)."""
    peft_config, tensors = _read_peft(directory)
    kind = _init_kind(peft_config, Path(directory) / PEFT_CONFIG, bool(peft_config.get("fan_in_fan_out")))
    _refuse_unsupported(peft_config, Path(directory) / PEFT_CONFIG)
    r = peft_config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterFileError(f"{directory}: adapter_config.json has invalid r={r!r}")
    tensors = dict(tensors)
    saved, token_ids, new_rows = _import_extras(model, peft_config, tensors, directory)  # takes their tensors
    experts = _import_experts(model, peft_config, tensors, directory, kind)  # takes theirs too
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        stem = key.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if stem.endswith(suffix):
                    factors.setdefault(stem[: -len(suffix)], {})[part] = value
                    break
            else:
                continue
            break
        else:
            raise AdapterFileError(
                f"{directory}: tensor {key!r} is not a LoRA A/B weight of a linear layer; lorakit cannot import it"
            )
    if not factors:
        raise AdapterFileError(
            f"{directory}: the adapter has no LoRA on a linear layer (target_modules); lorakit needs at least one "
            "beside target_parameters, so load it in PEFT"
        )
    rank_pattern, alpha_pattern = peft_config.get("rank_pattern") or {}, peft_config.get("alpha_pattern") or {}
    alpha = peft_config.get("lora_alpha", 8)
    shapes = {
        name: (pattern_value(rank_pattern, name, r), pattern_value(alpha_pattern, name, alpha)) for name in factors
    }
    for name, pair in factors.items():
        rank = shapes[name][0]
        if set(pair) != {"lora_A", "lora_B"} or pair["lora_A"].shape[0] != rank or pair["lora_B"].shape[1] != rank:
            raise AdapterFileError(f"{directory}: module {name} lacks a rank-{rank} lora_A/lora_B pair")
    layers, configs = {}, {}
    try:
        if is_adapted(model):
            raise ConfigError("the model already has adapters; import onto a fresh base model")
        groups: dict[tuple, list[str]] = {}  # modules of one (r, alpha) are built together
        for name in sorted(factors):
            groups.setdefault(shapes[name], []).append(name)
        rslora = bool(peft_config.get("use_rslora", False))
        for (rank, module_alpha), names in groups.items():
            # PiSSA comes in as a rank-2r LoRA of the same scale s = alpha / r (alpha / √r with rsLoRA)
            built = 2 * rank if kind == "pissa" else rank
            scale = module_alpha / (math.sqrt(rank) if rslora else rank)
            config = AdapterConfig(
                method="olora" if kind == "olora" else "lora",
                r=built,
                alpha=float(module_alpha) if built == rank else scale * (math.sqrt(built) if rslora else built),
                rslora=rslora,
                dropout=float(peft_config.get("lora_dropout") or 0.0),
                targets=sorted(factors),
                modules_to_save=sorted(saved) or None,
                trainable_tokens=token_ids,
                target_parameters=peft_config.get("target_parameters") or None,
            )
            configs.update(dict.fromkeys(names, config))
            # OLoRA's initialize() computes (A0, B0) from the base, as PEFT's init does on load
            exact = dataclasses.replace(config, targets=names)
            layers.update(build_layers(model, exact, initialize=kind == "olora"))
        saved_built = saved_modules.build(model, sorted(saved))
        rows_built = token_rows.build(model, config, list(layers), sorted(saved))
    except ConfigError as exc:
        raise AdapterFileError(f"PEFT adapter at {directory} does not fit this model: {exc}") from None
    layers = {name: layers[name] for name in sorted(factors)}
    for name, layer in layers.items():
        a, b = factors[name]["lora_A"], factors[name]["lora_B"]
        rank = shapes[name][0]
        need_a, need_b = (rank, layer.in_features), (layer.out_features, rank)
        if tuple(a.shape) != need_a or tuple(b.shape) != need_b:
            raise AdapterFileError(
                f"{directory}: module {name} has A {tuple(a.shape)} / B {tuple(b.shape)}, the model needs {need_a} / {need_b}"
            )
    install(model, layers)
    for name, layer in layers.items():
        layer.config = configs[name]
        a, b = factors[name]["lora_A"], factors[name]["lora_B"]
        if kind == "olora":  # the trained factors; A0, B0 stay as recomputed from the base
            with torch.no_grad():
                layer.A.copy_(a)
                layer.B.copy_(b)
            continue
        if kind == "pissa":
            a0, b0 = pissa_start(layer.base_weight_linear(), shapes[name][0], layer.scale)
            a, b = torch.cat([a.to(a0), a0]), torch.cat([b.to(b0), -b0], dim=1)
        layer.load_tensors({"A": a, "B": b})
    expert_lora.install(model, experts)
    saved_modules.install(model, saved_built)
    for name, values in saved.items():
        saved_built[name].load_tensors(values)
    token_rows.install(model, rows_built)
    with torch.no_grad():
        for name, value in new_rows.items():  # an untied head PEFT did not train keeps its rows as they are
            if "rows" in rows_built[name]._parameters:  # a tied head uses the embedding's
                rows_built[name].rows.copy_(value)
    return model


def _import_experts(model: nn.Module, peft_config: dict, tensors: dict, directory, kind: str) -> dict:
    """PEFT's target_parameters (a LoRA per expert), taken out of `tensors`: {experts module: ExpertLoRA}."""
    targets = peft_config.get("target_parameters")
    if not targets:
        return {}
    if kind != "lora":
        raise AdapterFileError(
            f"{directory}: init_lora_weights={peft_config.get('init_lora_weights')!r} with target_parameters is not "
            "supported; lorakit imports a plain LoRA on expert parameters"
        )
    stems = {key.removeprefix(PREFIX): key for key in tensors}
    r, alpha = peft_config.get("r"), peft_config.get("lora_alpha", 8)
    root = math.sqrt if peft_config.get("use_rslora") else (lambda rank: rank)

    def shape_of(name: str) -> tuple[int, float]:
        rank = pattern_value(peft_config.get("rank_pattern") or {}, name, r)
        return rank, pattern_value(peft_config.get("alpha_pattern") or {}, name, alpha) / root(rank)

    def take(key: str):
        stem = next((s for s in (key, key.replace(".weight", ".default.weight")) if s in stems), None)
        return None if stem is None else tensors.pop(stems.pop(stem))

    try:
        return expert_lora.from_peft(model, targets, take, shape_of)
    except AdapterFileError as exc:
        raise AdapterFileError(f"PEFT adapter at {directory} does not fit this model: {exc}") from None


def _import_extras(model: nn.Module, peft_config: dict, tensors: dict, directory):
    """PEFT's modules_to_save and trainable tokens, taken out of `tensors`: ({module: {tensor: value}}, token ids or
    None, {module: new rows}).

    Modules are selected as the PEFT that wrote the file selected them. PEFT 0.22 matches an entry at a dot boundary
    (`_is_valid_match` in peft/utils/other.py: "norm" is `model.norm`, not `input_layernorm`); earlier versions took
    every name that ends with the entry, so "norm" also saved each layer's norms. A dot-boundary match must be in the
    file; a plain-suffix match is taken when the file holds its tensors, which only a PEFT before 0.22 writes."""
    stems = {key.removeprefix(PREFIX): key for key in tensors}
    saved = {}
    patterns = peft_config.get("modules_to_save") or []
    names = [n for n, _ in model.named_modules() if n and any(n.endswith(p) for p in patterns)]
    if patterns and not names:
        raise AdapterFileError(f"{directory}: modules_to_save {patterns} match no module of this model")
    for name in [n for n in names if saved_modules.covered(n, [m for m in names if m != n]) is None]:
        at_boundary = any(name == p or name.endswith("." + p) for p in patterns)
        state = model.get_submodule(name).state_dict()
        found = {key: stem for key in state for stem in (f"{name}.{key}", f"{name}.{SAVED_COPY}{key}") if stem in stems}
        if not (found or at_boundary):
            continue
        missing = [key for key, value in state.items() if key not in found and value.is_floating_point()]
        if missing:
            raise AdapterFileError(f"{directory}: modules_to_save {name} lacks its tensor {missing[0]!r}; re-save it")
        saved[name] = {key: tensors.pop(stems.pop(stem)) for key, stem in found.items()}
    indices = peft_config.get("trainable_token_indices")
    if indices is None:
        return saved, None, {}
    (embed_name, _), (head_name, _) = token_rows._embedding_and_head(model)
    if isinstance(indices, list):
        indices = {embed_name: indices}
    wanted = {}
    for key, ids in indices.items() if isinstance(indices, dict) else ():
        name = next((n for n in (embed_name, head_name) if n and (n == key or n.endswith("." + key))), None)
        if name is None:
            raise AdapterFileError(
                f"{directory}: trainable_token_indices on {key!r}, which is not the input embedding {embed_name} or "
                "the output head; lorakit trains token rows of those two only"
            )
        wanted[name] = ids
    values = list(wanted.values())
    if embed_name not in wanted or any(v != values[0] for v in values):
        raise AdapterFileError(
            f"{directory}: trainable_token_indices {indices} must give the input embedding {embed_name} (and the head "
            "the same ids, if any); lorakit trains the same token rows in both"
        )
    rows = {}
    for name in wanted:
        stem = f"{name}.{TOKENS_DELTA}"
        if stem in stems:
            rows[name] = tensors.pop(stems.pop(stem))
    if embed_name not in rows:
        raise AdapterFileError(f"{directory}: the trainable tokens of {embed_name} are missing; re-save it with PEFT")
    return saved, values[0], rows
