"""Property-based tests (hypothesis) over random layer shapes, ranks, methods and LoRA-Mini outer matrices."""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Stack(nn.Module):
    def __init__(self, widths: list[int], seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@st.composite
def cases(draw):
    widths = draw(st.lists(st.integers(2, 24), min_size=2, max_size=4))
    narrowest = min(min(a, b) for a, b in zip(widths, widths[1:]))
    method = draw(st.sampled_from(["lora", "olora", "mini"]))
    outer = draw(st.sampled_from(["orthonormal", "normal", "qr"]))
    r = draw(st.integers(1, narrowest if method == "olora" else 8))
    ab_limit = narrowest if method == "mini" and outer != "normal" else 12
    mini = dict(mini_outer=outer, mini_a=draw(st.integers(1, ab_limit)), mini_b=draw(st.integers(1, ab_limit)))
    config = lorakit.AdapterConfig(
        method=method,
        r=r,
        alpha=draw(st.floats(0.5, 16)),
        **(mini if method == "mini" else {}),
        rslora=draw(st.booleans()),
        seed=draw(st.integers(0, 100)),
    )
    return widths, config, draw(st.integers(0, 1000))


def perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.adapter_layers(model):
            for p in layer.trainable_parameters().values():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def build(widths, config, seed):
    base = Stack(widths, seed)
    model = lorakit.adapt(copy.deepcopy(base), config)
    perturb(model, seed)
    x = torch.randn(5, widths[0], generator=torch.Generator().manual_seed(seed))
    return base, model, x


@SETTINGS
@given(cases())
def test_merge_unmerge_invariants(case):
    widths, config, seed = case
    base, model, x = build(widths, config, seed)
    with torch.no_grad():
        adapted = model(x)
        weights = [layer.base_layer.weight.clone() for _, layer in lorakit.adapter_layers(model)]
        lorakit.merge(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-4, rtol=1e-4)
        lorakit.unmerge(model)
        for (_, layer), weight in zip(lorakit.adapter_layers(model), weights):
            torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-5, rtol=1e-5)
        with lorakit.disabled(model):
            torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-5)
        counts = {
            n: sum(p.numel() for p in l.trainable_parameters().values()) for n, l in lorakit.adapter_layers(model)
        }
        for name, layer in lorakit.adapter_layers(model):
            inner = config.mini_a + config.mini_b if config.method == "mini" else layer.in_features + layer.out_features
            assert counts[name] == config.r * inner


@SETTINGS
@given(cases())
def test_save_load_round_trip(case):
    widths, config, seed = case
    base, model, x = build(widths, config, seed)
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(model, tmp)
        loaded = lorakit.load_adapter(copy.deepcopy(base), tmp)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_export_peft_round_trip(case):
    peft = pytest.importorskip("peft")
    widths, config, seed = case
    base, model, x = build(widths, config, seed)
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.export_peft(model, tmp)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
        ours_again = lorakit.import_peft(copy.deepcopy(base), tmp)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours_again(x), model(x), atol=1e-4, rtol=1e-4)
