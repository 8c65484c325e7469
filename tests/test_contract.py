"""The contract every registered method fulfils, on Llama, GPT-2 (Conv1D) and BERT."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, UNSUPPORTED, VARIANTS, fresh_copy, make_config, model_output, perturb_adapters

import lorakit
from lorakit.inject import trainable_parameters

CASES = [(v, m) for v in VARIANTS for m in MODEL_FACTORIES if (v, m) not in UNSUPPORTED]


@pytest.fixture(params=CASES, ids=[f"{v}-{m}" for v, m in CASES])
def case(request, inputs):
    variant, family = request.param
    base = MODEL_FACTORIES[family]()
    model = lorakit.adapt(fresh_copy(base), make_config(variant))
    return variant, base, model, inputs


def test_output_unchanged_at_init(case):
    _, base, model, inputs = case
    torch.testing.assert_close(model_output(model, inputs), model_output(base, inputs), atol=1e-5, rtol=1e-5)


def test_every_layer_is_wrapped_and_exposes_base_and_delta(case):
    variant, base, model, _ = case
    layers = dict(lorakit.adapter_layers(model))
    assert layers, "nothing was adapted"
    for name, layer in layers.items():
        assert isinstance(layer, lorakit.AdapterLayer)
        assert layer.method == VARIANTS[variant]["method"]
        assert type(layer.base_layer) is type(base.get_submodule(name))
        assert layer.delta_weight().shape == layer.base_layer.weight.shape


def test_merged_equals_unmerged_and_unmerge_restores(case):
    _, _, model, inputs = case
    perturb_adapters(model)
    unmerged = model_output(model, inputs)
    weights = {n: l.base_layer.weight.clone() for n, l in lorakit.adapter_layers(model)}
    lorakit.merge(model)
    assert all(layer.merged for _, layer in lorakit.adapter_layers(model))
    torch.testing.assert_close(model_output(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    for name, layer in lorakit.adapter_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(model_output(model, inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_adds_delta_weight(case):
    _, _, model, _ = case
    perturb_adapters(model)
    layer = next(layer for _, layer in lorakit.adapter_layers(model))
    before = layer.base_layer.weight.clone()
    delta = layer.delta_weight()
    lorakit.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, before + delta, atol=1e-6, rtol=1e-6)


def test_merging_twice_is_refused(case):
    _, _, model, _ = case
    lorakit.merge(model)
    with pytest.raises(lorakit.ConfigError, match="already merged"):
        lorakit.merge(model)


def test_disabled_gives_original_model(case):
    _, base, model, inputs = case
    perturb_adapters(model)
    adapted = model_output(model, inputs)
    expected = model_output(base, inputs)
    with lorakit.disabled(model):
        torch.testing.assert_close(model_output(model, inputs), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model_output(model, inputs), adapted)
    lorakit.merge(model)
    with lorakit.disabled(model):
        torch.testing.assert_close(model_output(model, inputs), expected, atol=1e-5, rtol=1e-5)
    assert all(layer.merged for _, layer in lorakit.adapter_layers(model))


def test_unload_returns_original_weights(case):
    _, base, model, inputs = case
    perturb_adapters(model)
    lorakit.merge(model)
    plain = lorakit.unload(model)
    assert not list(lorakit.adapter_layers(plain))
    original = base.state_dict()
    restored = plain.state_dict()
    assert restored.keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=0)


def test_only_declared_parameters_train(case):
    _, _, model, inputs = case
    perturb_adapters(model)  # so that both factors receive non-zero gradients
    declared = {id(p) for p in trainable_parameters(model)}
    assert declared
    for name, param in model.named_parameters():
        assert param.requires_grad == (id(param) in declared), name
    model_output(model, inputs).square().mean().backward()
    for name, param in model.named_parameters():
        if id(param) in declared:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_trainable_counts(case):
    variant, _, model, _ = case
    config = make_config(variant)
    for name, layer in lorakit.adapter_layers(model):
        count = sum(p.numel() for p in layer.trainable_parameters().values())
        if config.method == "mini":
            assert count == config.r * (config.mini_a + config.mini_b), name
        elif config.method in ("lora", "olora", "melora"):
            assert count == config.r * (layer.in_features + layer.out_features), name
        elif config.method == "loraxs":
            assert count == config.r**2, name
        # the other methods check their own formulas in tests/methods/
    summary = lorakit.summary(model)
    assert summary.trainable == sum(row[-1] for row in summary.rows)
    assert "trainable params" in str(summary)


def test_output_head_is_not_adapted(case):
    _, base, model, _ = case
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        pytest.skip("model has no output head")
    names = dict(lorakit.adapter_layers(model))
    assert not any(name.endswith(("lm_head", "decoder")) for name in names)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base(variant, dtype, inputs):
    base = MODEL_FACTORIES["llama"]().to(dtype)
    model = lorakit.adapt(fresh_copy(base), make_config(variant))
    trained = lorakit.inject.trainable_parameters(model)  # each layer's and the shared ones (LoRTA's are only shared)
    assert trained and all(p.dtype == torch.float32 for p in trained)
    for _, layer in lorakit.adapter_layers(model):
        assert layer.base_layer.weight.dtype == dtype
    out = model_output(model, inputs)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), model_output(base, inputs).float(), atol=0.05, rtol=0.05)
    perturb_adapters(model)
    model_output(model, inputs).float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in trained)
    with torch.no_grad():
        adapted = model_output(model, inputs).float()
        lorakit.merge(model)
        torch.testing.assert_close(model_output(model, inputs).float(), adapted, atol=0.1, rtol=0.1)
