"""LoRA specifics: init distributions, scale, rsLoRA, dropout."""

from __future__ import annotations

import math

import torch
from conftest import tiny_llama

import lorakit


def test_kaiming_uniform_bounds_and_zero_b():
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=4))
    for _, layer in lorakit.adapter_layers(model):
        bound = 1 / math.sqrt(layer.in_features)
        assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.5 * bound
        assert torch.count_nonzero(layer.B) == 0


def test_gaussian_init_std_is_one_over_r():
    model = lorakit.adapt(
        tiny_llama(hidden_size=256, intermediate_size=256), lorakit.AdapterConfig(r=4, init="gaussian")
    )
    values = torch.cat([l.A.flatten() for _, l in lorakit.adapter_layers(model)])
    assert abs(values.std().item() - 0.25) < 0.01


def test_scale_and_rslora():
    assert lorakit.AdapterConfig(r=16, alpha=32).scale == 2.0
    assert lorakit.AdapterConfig(r=16, alpha=32, rslora=True).scale == 8.0
    assert lorakit.AdapterConfig(r=8).alpha == 8


def test_dropout_only_in_training(inputs):
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=4, dropout=0.5))
    for _, layer in lorakit.adapter_layers(model):
        torch.nn.init.normal_(layer.B)
    model.eval()
    assert torch.equal(model(inputs).logits, model(inputs).logits)
    model.train()
    assert not torch.equal(model(inputs).logits, model(inputs).logits)


def test_targets_suffix_regex_and_exclude():
    names = lambda cfg: sorted(n for n, _ in lorakit.adapter_layers(lorakit.adapt(tiny_llama(), cfg)))  # noqa: E731
    assert names(lorakit.AdapterConfig(targets=["q_proj", "v_proj"])) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert names(lorakit.AdapterConfig(targets=r".*layers\.1\.mlp\..*")) == [
        f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")
    ]
    all_linear = names(lorakit.AdapterConfig(exclude=["mlp.down_proj"]))
    assert len(all_linear) == 12 and not any("down_proj" in n or "lm_head" in n for n in all_linear)
