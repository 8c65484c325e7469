"""LoRA-Mini specifics: outer matrices, trainable counts, forward as effective rank-r factors."""

from __future__ import annotations

import torch
from conftest import fresh_copy, model_output, perturb_adapters, tiny_llama

import lorakit


def mini(outer, **kw):
    return lorakit.AdapterConfig(method="mini", r=4, mini_a=8, mini_b=6, mini_outer=outer, **kw)


def test_orthonormal_outer_matrices():
    model = lorakit.adapt(tiny_llama(), mini("orthonormal"))
    for _, layer in lorakit.adapter_layers(model):
        torch.testing.assert_close(layer.A_out @ layer.A_out.T, torch.eye(8), atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.B_out.T @ layer.B_out, torch.eye(6), atol=1e-5, rtol=0)


def test_qr_outer_matrices_span_the_weight():
    base = tiny_llama()
    model = lorakit.adapt(fresh_copy(base), mini("qr"))
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    w = base.get_submodule("model.layers.0.mlp.up_proj").weight
    projector = layer.B_out @ layer.B_out.T  # projects onto span(B_out)
    torch.testing.assert_close(projector @ w[:, :6], w[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.A_out @ layer.A_out.T, torch.eye(8), atol=1e-5, rtol=0)


def test_normal_outer_matrices_are_standard_normal():
    model = lorakit.adapt(tiny_llama(hidden_size=64, intermediate_size=128), mini("normal"))
    values = torch.cat([l.A_out.flatten() for _, l in lorakit.adapter_layers(model)])
    assert abs(values.mean().item()) < 0.05 and abs(values.std().item() - 1) < 0.05


def test_delta_is_the_four_factor_product():
    model = lorakit.adapt(tiny_llama(), mini("orthonormal", alpha=3))
    perturb_adapters(model)
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    expected = (3 / 4) * layer.B_out @ layer.B_in @ layer.A_in @ layer.A_out
    torch.testing.assert_close(layer.delta_weight(), expected)


def test_outer_matrices_are_frozen_buffers_not_parameters(inputs):
    model = lorakit.adapt(tiny_llama(), mini("orthonormal"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith((".A_in", ".B_in")) for n in names)
    buffers = [n for n, _ in model.named_buffers() if n.endswith((".A_out", ".B_out"))]
    assert len(buffers) == 2 * len(list(lorakit.adapter_layers(model)))
    assert model_output(model, inputs).shape[-1] == 64


def test_regenerated_from_seed_and_name_independent_of_order():
    first = lorakit.adapt(tiny_llama(), mini("orthonormal", seed=7))
    second = lorakit.adapt(tiny_llama(seed=99), mini("orthonormal", seed=7, targets=["v_proj"]))
    a = first.get_submodule("model.layers.1.self_attn.v_proj")
    b = second.get_submodule("model.layers.1.self_attn.v_proj")
    assert torch.equal(a.A_out, b.A_out) and torch.equal(a.B_out, b.B_out) and torch.equal(a.A_in, b.A_in)
    other = lorakit.adapt(tiny_llama(), mini("orthonormal", seed=8))
    assert not torch.equal(a.A_out, other.get_submodule("model.layers.1.self_attn.v_proj").A_out)
