"""Config errors: a ValueError naming the field and the fix, raised before the model is touched."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_copy, tiny_bert, tiny_llama

import lorakit

BAD_CONFIGS = [
    (dict(r=0), "r=0 is invalid"),
    (dict(r=-3), "r=-3 is invalid"),
    (dict(r=2.5), "r=2.5 is invalid"),
    (dict(r=True), "r=True is invalid"),
    (dict(alpha=0), "alpha=0 is invalid"),
    (dict(alpha=-1.0), "alpha=-1.0 is invalid"),
    (dict(method="dora"), "method='dora' is unknown; use one of: lora, loraxs, lorta, melora, mini, mora, olora, prolora"),
    (dict(init="xavier"), "init='xavier' is unknown"),
    (dict(dropout=1.0), "dropout=1.0 is invalid"),
    (dict(method="mini", mini_a=0), "mini_a=0 is invalid"),
    (dict(method="mini", mini_b=-2), "mini_b=-2 is invalid"),
    (dict(method="mini", mini_outer="svd"), "mini_outer='svd' is unknown"),
    (dict(targets=[]), "targets=[] is invalid"),
    (dict(targets="(unclosed"), "not a valid regular expression"),
    (dict(seed=-1), "seed=-1 is invalid"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CONFIGS)
def test_bad_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        lorakit.AdapterConfig(**kwargs)


LAYER_ERRORS = [
    (dict(method="olora", r=40), "r=40 is too large for olora on model.layers.0.self_attn.q_proj"),
    (dict(method="mini", mini_a=64), "mini_a=64 is too large for mini_outer='orthonormal'"),
    (dict(method="mini", mini_b=49, mini_outer="qr"), "mini_b=49 is too large for mini_outer='qr'"),
    (dict(targets=["q_proj", "qkv"]), r"targets \['qkv'\] match no module; some linear modules are: q_proj"),
    (dict(targets="nothing.*"), "match no linear module; some available names: q_proj, k_proj"),
    (
        dict(targets=["self_attn"]),
        "target 'model.layers.0.self_attn' is a LlamaAttention, not a linear layer",
    ),
    (dict(targets=["q_proj"], exclude=["q_proj"]), "match no linear module"),
]


@pytest.mark.parametrize("kwargs,message", LAYER_ERRORS)
def test_layer_errors_leave_model_untouched(kwargs, message):
    base = tiny_llama()
    model = fresh_copy(base)
    with pytest.raises(ValueError, match=message):
        lorakit.adapt(model, lorakit.AdapterConfig(**kwargs))
    assert not list(lorakit.adapter_layers(model))
    for (name, a), (_, b) in zip(model.state_dict().items(), base.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in model.parameters())


def test_adapting_twice_is_refused():
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig())
    with pytest.raises(ValueError, match="already adapted"):
        lorakit.adapt(model, lorakit.AdapterConfig())


def test_mini_normal_allows_outer_ranks_wider_than_the_layer():
    model = lorakit.adapt(tiny_bert(), lorakit.AdapterConfig(method="mini", mini_a=64, mini_outer="normal"))
    assert list(lorakit.adapter_layers(model))


def test_operations_on_unadapted_model_are_refused():
    with pytest.raises(ValueError, match="no lorakit adapters"):
        lorakit.merge(tiny_llama())
    with pytest.raises(ValueError, match="not merged"):
        lorakit.unmerge(lorakit.adapt(tiny_llama(), lorakit.AdapterConfig()))


def test_config_round_trips_through_dict():
    cfg = lorakit.AdapterConfig(method="mini", r=4, targets=["q_proj"], mini_outer="qr")
    assert lorakit.AdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config field"):
        lorakit.AdapterConfig.from_dict({"method": "lora", "rank": 4})
