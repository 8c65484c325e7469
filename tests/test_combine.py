"""Combining adapters into a new one (lorakit.combine.add_weighted_adapter): cat, svd, linear."""

import pytest
import torch
from conftest import make_config, perturb_adapters, tiny_llama

import lorakit

WEIGHTS = [0.7, -1.3]


def pair(first="lora", second="lora", **second_overrides):
    model = lorakit.adapt(tiny_llama(), make_config(first, seed=1))
    perturb_adapters(model, seed=2)
    lorakit.adapt(model, make_config(second, seed=3, **second_overrides), name="b")
    perturb_adapters(model, seed=4, adapter="b")
    return model.eval()


def exact_delta(model, target, names=("default", "b"), weights=WEIGHTS):
    layers = [dict(lorakit.adapter_layers(model, n)).get(target) for n in names]  # a module one adapter lacks: 0
    return sum(w * layer.total_delta_linear() for w, layer in zip(weights, layers) if layer is not None)


def combined_delta(model, target, name="c"):
    return dict(lorakit.adapter_layers(model, name))[target].total_delta_linear()


TARGET = "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize(("first", "second"), [("lora", "lora"), ("olora", "mini-orthonormal"), ("lorta", "loraxs")])
def test_cat_is_exact_across_methods(first, second):
    model = pair(first, second)
    report = lorakit.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "c", combination_type="cat")
    assert report.relative_error == 0.0
    for target, _ in lorakit.adapter_layers(model, "c"):
        torch.testing.assert_close(combined_delta(model, target), exact_delta(model, target), rtol=0, atol=1e-6)
    layer = dict(lorakit.adapter_layers(model, "c"))[TARGET]
    ranks = [dict(lorakit.adapter_layers(model, n))[TARGET].route_factors()[0].shape[0] for n in ("default", "b")]
    assert layer.method == "lora" and layer.r == sum(ranks)
    assert not lorakit.adapters(model)[-1].active  # idle until set_active, as PEFT


def test_svd_reaches_the_best_rank_k_error_and_reports_it():
    model = pair()
    report = lorakit.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "c", combination_type="svd", svd_rank=3)
    exact = exact_delta(model, TARGET).double()
    singular = torch.linalg.svdvals(exact)
    best = float(singular[3:].norm() / singular.norm())  # Eckart–Young: the smallest rank-3 error
    error = float((combined_delta(model, TARGET).double() - exact).norm() / exact.norm())
    assert error == pytest.approx(best, rel=1e-4)
    assert report.module_errors[TARGET] == pytest.approx(best, rel=1e-4)
    assert 0 < report.relative_error < 1
    assert dict(lorakit.adapter_layers(model, "c"))[TARGET].r == 3


def test_svd_at_full_rank_is_exact():
    model = pair()
    report = lorakit.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "c", combination_type="svd", svd_rank=16)
    assert report.relative_error < 1e-6
    torch.testing.assert_close(combined_delta(model, TARGET), exact_delta(model, TARGET), rtol=0, atol=1e-6)


def test_linear_is_exact_where_the_update_is_linear_and_reports_the_error_otherwise():
    xs = pair("loraxs", "loraxs")
    report = lorakit.add_weighted_adapter(xs, ["default", "b"], WEIGHTS, "c", combination_type="linear")
    assert report.relative_error < 1e-6 and dict(lorakit.adapter_layers(xs, "c"))[TARGET].method == "loraxs"
    torch.testing.assert_close(combined_delta(xs, TARGET), exact_delta(xs, TARGET), rtol=0, atol=1e-6)
    lora = pair()
    report = lorakit.add_weighted_adapter(lora, ["default", "b"], WEIGHTS, "c", combination_type="linear")
    measured = float(
        (combined_delta(lora, TARGET) - exact_delta(lora, TARGET)).double().norm()
        / exact_delta(lora, TARGET).double().norm()
    )
    assert report.module_errors[TARGET] == pytest.approx(measured, rel=1e-4) and measured > 0.01


def test_refusals_name_the_problem():
    model = pair("lora", "mora")
    with pytest.raises(lorakit.ConfigError, match="no low-rank factors"):
        lorakit.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "c", combination_type="cat")
    with pytest.raises(lorakit.ConfigError, match="one method"):
        lorakit.add_weighted_adapter(model, ["default", "b"], WEIGHTS, "c", combination_type="linear")
    with pytest.raises(lorakit.ConfigError, match="one per adapter"):
        lorakit.add_weighted_adapter(model, ["default", "b"], [1.0], "c", combination_type="cat")
    with pytest.raises(lorakit.ConfigError, match="unknown"):
        lorakit.add_weighted_adapter(model, ["default"], [1.0], "c", combination_type="ties")
    assert [a.name for a in lorakit.adapters(model)] == ["default", "b"]
