"""Combine adapters into a new one, as PEFT's `add_weighted_adapter` (same argument names).

For adapters a_1..a_n with weights w_i, the target update of each module is

    Δ = Σ_i w_i · s_i·ΔW_i                      (s_i·ΔW_i = B_i A_i from `AdapterLayer.route_factors`)

- "cat": the exact Δ as one LoRA of rank Σ r_i: A = [A_1; ...; A_n], B = [w_1 B_1, ..., w_n B_n], scale 1.
  Any mix of low-rank methods (OLoRA enters as its rank-2r export [B | −B0][A ; A0]).
- "svd": the best rank-k LoRA of Δ (Eckart–Young), k = `svd_rank` (default: the largest r_i). Computed from the
  factors, never the dense Δ: QR of B_cat and A_catᵀ, then the SVD of the small (Σ r_i)² core. The report gives the
  relative error ‖Δ − Δ_k‖_F / ‖Δ‖_F, per module and over the model.
- "linear": one adapter of the SAME method, config and frozen tensors, whose trained tensors are Σ w_i θ_i. Exact
  where the update is linear in them (LoRA-XS's R, MoRA's M); for two-factor methods (LoRA: B A) it is not
  (cross terms), and the report gives the relative error against the exact Δ. PEFT's "linear" combines
  sqrt(w_i·s_i)-scaled A and B instead, equally inexact; lorakit says by how much.

A method whose update is not low rank (MoRA's rotation / compression) has no factors to concatenate: "cat" and
"svd" refuse it in one line. The new adapter is idle until `set_active`, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .inject import _names, adapter_layers, build_layers, install, new_adapter_name, shared_parameters

COMBINATIONS = ("cat", "linear", "svd")


@dataclass
class CombinedAdapter:
    name: str
    combination_type: str
    rank: int  # the largest rank of the new adapter's modules
    relative_error: float  # ‖Δ_new − Δ‖_F / ‖Δ‖_F over all modules (0 for "cat")
    module_errors: dict[str, float]


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> CombinedAdapter:
    """Add adapter `adapter_name` combining `adapters` with `weights` (see the module docstring)."""
    names = _names(model, adapters)
    if not names:
        raise ConfigError("adapters=[] names no adapter; pass the names of the adapters to combine")
    if len(weights) != len(names) or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be {len(names)} finite numbers, one per adapter; got {weights!r}")
    if combination_type not in COMBINATIONS:
        raise ConfigError(f"combination_type={combination_type!r} is unknown; use one of: {', '.join(COMBINATIONS)}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ConfigError(f"svd_rank={svd_rank!r} is invalid; use a positive integer")
    new_adapter_name(model, adapter_name)
    layers = {name: dict(adapter_layers(model, name)) for name in names}
    if combination_type == "linear":
        built, errors, norms = _linear(model, names, weights, layers, adapter_name)
    else:
        built, errors, norms = _low_rank(model, names, weights, layers, adapter_name, combination_type, svd_rank)
    total = math.sqrt(sum(norms.values()))
    error = math.sqrt(sum((errors[m] ** 2) * norms[m] for m in errors)) / total if total > 0 else 0.0
    rank = max(layer.r for layer in built.values())
    install(model, built, name=adapter_name)
    return CombinedAdapter(adapter_name, combination_type, rank, error, errors)


def _targets(layers: dict) -> list[str]:
    return list(dict.fromkeys(target for per_adapter in layers.values() for target in per_adapter))


def _factors(adapter: str, target: str, layer) -> tuple[torch.Tensor, torch.Tensor]:
    factors = layer.route_factors()
    if factors is None:
        raise ConfigError(
            f"adapter {adapter!r} ({layer.method}) has no low-rank factors on {target}, so it cannot be combined "
            "by 'cat' or 'svd'; use combination_type='linear' with adapters of the same method"
        )
    return tuple(t.detach().to(torch.float64) for t in factors)


@torch.no_grad()
def _low_rank(model, names, weights, layers, adapter_name, combination_type, svd_rank):
    """Per target module: the combined LoRA factors (A, B) with scale 1, and the relative error."""
    combined, errors, norms = {}, {}, {}
    for target in _targets(layers):
        parts = [
            (weight, *_factors(name, target, layers[name][target]))
            for name, weight in zip(names, weights)
            if target in layers[name]
        ]
        a = torch.cat([a for _, a, _ in parts])
        b = torch.cat([weight * b for weight, _, b in parts], dim=1)
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.T)
        core = r_b @ r_a.T  # Δ = q_b · core · q_aᵀ
        u, s, vh = torch.linalg.svd(core)
        norms[target] = float((s**2).sum())
        if combination_type == "cat":
            errors[target] = 0.0
        else:
            k = min(svd_rank or max(layers[name][target].r for name in names if target in layers[name]), len(s))
            tail = float((s[k:] ** 2).sum())
            errors[target] = math.sqrt(tail / norms[target]) if norms[target] > 0 else 0.0
            b, a = (q_b @ u[:, :k]) * s[:k], vh[:k] @ q_a.T
        combined[target] = (a, b)
    reference = next(iter(layers[names[0]].values()))
    groups: dict[int, list[str]] = {}
    for target, (a, _) in combined.items():
        groups.setdefault(a.shape[0], []).append(target)
    built = {}
    for rank, targets in groups.items():
        config = dataclasses.replace(
            reference.config, method="lora", r=rank, alpha=rank, targets=targets, exclude=None, extra={},
            init="kaiming", rslora=False, dropout=0.0,
        )
        built.update(build_layers(model, config, initialize=False, name=adapter_name))
    for target, layer in built.items():
        a, b = combined[target]
        layer.A.copy_(a.to(layer.A.dtype))
        layer.B.copy_(b.to(layer.B.dtype))
    return {target: built[target] for target in combined}, errors, norms


@torch.no_grad()
def _linear(model, names, weights, layers, adapter_name):
    """One adapter of the shared method whose trained tensors are Σ w_i θ_i."""
    first = layers[names[0]]
    reference = next(iter(first.values()))
    for name in names[1:]:
        other = next(iter(layers[name].values()))
        if set(layers[name]) != set(first) or other.method != reference.method or _shape_config(
            other.config
        ) != _shape_config(reference.config):
            raise ConfigError(
                f"combination_type='linear' needs adapters of one method, config and targets; {name!r} "
                f"({other.method}, r={other.config.r}) differs from {names[0]!r} ({reference.method}, "
                f"r={reference.config.r}); use 'cat' or 'svd'"
            )
    config = dataclasses.replace(reference.config, targets=list(first), exclude=None)
    built = build_layers(model, config, initialize=False, name=adapter_name)
    shared_in = [shared_parameters(model, name) for name in names]
    errors, norms = {}, {}
    for target, layer in built.items():
        sources = [layers[name][target] for name in names]
        for key, value in layer.named_buffers(recurse=False):  # frozen tensors: must be the same in every adapter
            if not all(torch.equal(getattr(src, key), getattr(sources[0], key)) for src in sources):
                raise ConfigError(
                    f"combination_type='linear' needs equal frozen tensors, but {key} of {target} differs between "
                    f"adapters (other seeds or bases); use 'cat' or 'svd'"
                )
            value.copy_(getattr(sources[0], key))
        for key in layer.stored:
            getattr(layer, key).copy_(sum(w * getattr(src, key) for w, src in zip(weights, sources)))
        layer.after_load()
    shared = next((layer.shared for layer in built.values() if layer.shared is not None), None)
    if shared is not None:
        for key in shared.stored:
            getattr(shared, key).copy_(sum(w * getattr(src, key) for w, src in zip(weights, shared_in)))
    for target, layer in built.items():
        exact = sum(w * layers[name][target].total_delta_linear() for name, w in zip(names, weights))
        norms[target] = float(exact.double().norm() ** 2)
        diff = float((layer.total_delta_linear() - exact).double().norm() ** 2)
        errors[target] = math.sqrt(diff / norms[target]) if norms[target] > 0 else 0.0
    return built, errors, norms


def _shape_config(config) -> dict:
    return {key: value for key, value in config.to_dict().items() if key not in ("seed", "init", "dropout")}
