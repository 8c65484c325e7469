"""OLoRA specifics: factors and mutated base equal real PEFT's; the thin QR equals the full one; Conv1D."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_copy, model_output, tiny_gpt2, tiny_llama

import lorakit
from lorakit.methods.olora import olora_factors

peft = pytest.importorskip("peft")


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("r", [1, 4, 16])
def test_factors_and_mutated_base_equal_peft(r):
    base = tiny_llama()
    ours = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=r, alpha=2 * r))
    theirs = peft.get_peft_model(
        fresh_copy(base),
        peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights="olora"),
    )
    compared = 0
    for name, layer in lorakit.adapter_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert rel_err(layer.A, peft_layer.lora_A["default"].weight) < 1e-5, name
        assert rel_err(layer.B, peft_layer.lora_B["default"].weight) < 1e-5, name
        assert rel_err(layer.base_layer.weight, peft_layer.base_layer.weight) < 1e-5, name
        compared += 1
    assert compared == 14


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (64, 64)])
def test_thin_qr_equals_full_qr(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    q, rr = torch.linalg.qr(w)
    a, b = olora_factors(w, 5)
    torch.testing.assert_close(a, rr[:5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, q[:, :5], atol=1e-5, rtol=1e-5)


def test_conv1d_factors_are_taken_in_linear_layout(inputs):
    base = tiny_gpt2()
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=4))
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    original = base.get_submodule("transformer.h.0.attn.c_attn").weight.T  # out x in
    q, rr = torch.linalg.qr(original)
    torch.testing.assert_close(layer.B0, q[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.A0, rr[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model_output(model, inputs), model_output(base, inputs), atol=1e-5, rtol=1e-5)


def test_unload_undoes_the_mutation_unlike_peft_disable(inputs):
    base = tiny_llama()
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=4))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert not torch.allclose(layer.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)
    lorakit.unload(model)
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_proj.weight,
        base.model.layers[0].self_attn.q_proj.weight,
        atol=1e-6,
        rtol=0,
    )
