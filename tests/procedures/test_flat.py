"""Flat-LoRA (lorakit.procedures.flat): filter-wise noise on W + sΔW, never a trace on the base weights."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VARIANTS, fresh_copy, make_config, model_output, perturb_adapters, tiny_llama
from torch.profiler import ProfilerActivity, profile

import lorakit
from lorakit.procedures import PROCEDURES, parse_procedure
from lorakit.procedures.base import TrainingState
from lorakit.procedures.flat import FlatLora, noise_scale


def adapted(variant="lora", dtype=torch.float32):
    model = lorakit.adapt(fresh_copy(tiny_llama()).to(dtype), make_config(variant))
    perturb_adapters(model)
    return model


def state(model, step, total=10, seed=0):
    return TrainingState(model, None, None, step, total, seed)


def test_noise_schedule_rises_from_zero_to_one():
    assert noise_scale(0, 10) == 0.0 and noise_scale(10, 10) == pytest.approx(1.0)
    assert noise_scale(5, 10) == pytest.approx(0.5)
    values = [noise_scale(t, 10) for t in range(11)]
    assert values == sorted(values)


def test_options_and_registry():
    assert PROCEDURES["flat"] is FlatLora
    assert parse_procedure("flat") == ("flat", {})
    assert parse_procedure("flat:rho=0.1") == ("flat", {"rho": 0.1})
    with pytest.raises(lorakit.ConfigError, match="rho=-1 of flat is invalid; use a number >= 0"):
        parse_procedure("flat:rho=-1")
    with pytest.raises(lorakit.ConfigError, match="--procedure 'sam' is unknown; use one of: .*flat"):
        parse_procedure("sam")


@pytest.mark.parametrize("variant", ["lora", "mini-orthonormal", "mora", "lorta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_leaves_base_weights_bit_identical_and_the_noise_acts(variant, dtype, inputs):
    model = adapted(variant, dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    clean = model_output(model, inputs)
    flat = FlatLora({"rho": 0.05})
    optimizer = torch.optim.AdamW(lorakit.inject.trainable_parameters(model), lr=1e-2)
    for step in (3, 7):
        moment = TrainingState(model, optimizer, None, step, 10, 0)
        flat.before_step(moment)
        noisy = model_output(model, inputs)
        assert not torch.equal(noisy, clean)  # the forward really sees W + ε
        noisy.float().square().mean().backward()
        flat.after_backward(moment)
        assert all(layer.weight_noise is None for _, layer in lorakit.adapter_layers(model))
        with torch.no_grad():  # without the optimizer step the clean model is exactly back
            assert torch.equal(model_output(model, inputs), clean)
        optimizer.step()
        optimizer.zero_grad()
        clean = model_output(model, inputs)
    for key, value in model.state_dict().items():
        if key.endswith("base_layer.weight") or "base_layer" in key:
            assert torch.equal(value, original[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_std_per_row_follows_the_merged_weight_norm(dtype):
    """σ_i = f(t)·ρ·‖W'_i‖/√in with W' = W + sΔW, checked on a wide layer where the sample std is precise."""
    base = tiny_llama(hidden_size=64, intermediate_size=4096, num_attention_heads=4, num_key_value_heads=4).to(dtype)
    model = lorakit.adapt(base, lorakit.AdapterConfig(method="lora", r=4, targets=["down_proj"]))
    perturb_adapters(model, scale=0.3)
    name, layer = next(iter(lorakit.adapter_layers(model)))
    step, total, rho = 6, 10, 0.2
    noise = FlatLora({"rho": rho}).draw(layer, name, noise_scale(step, total) * rho, state(model, step, total))
    assert noise.dtype == dtype
    merged = layer.base_layer.weight.float() + layer.delta_weight().float()
    expected = noise_scale(step, total) * rho * merged.norm(dim=1) / math.sqrt(layer.in_features)
    torch.testing.assert_close(noise.float().std(dim=1), expected, rtol=0.05, atol=0)
    # centred: each row's sample mean within 5 standard errors (σ_i / √in) of 0
    assert (noise.float().mean(dim=1).abs() / expected).max() <= 5 / math.sqrt(layer.in_features)
    # rows of different norm get different noise: the scale is per row, not per matrix
    assert expected.max() / expected.min() > 1.2


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sigma_is_the_papers_row_norm_of_the_merged_weight(variant):
    """σ_i = f(t)·ρ·‖W_i + s·ΔW_i‖/√in (Flat-LoRA, arXiv:2409.14396, Eq. 7: ε_i ~ N(0, σ²‖W'_i‖²/n)), for every
    method, against the merged weight computed here in float64 from the dense update."""
    model = adapted(variant)
    step, total, rho = 6, 10, 0.2
    factor = noise_scale(step, total) * rho
    for name, layer in lorakit.adapter_layers(model):
        sigma = FlatLora({"rho": rho}).noise(layer, name, factor, state(model, step, total)).sigma
        merged = layer.base_weight_linear().double() + layer.delta_linear().detach().double()
        expected = factor * torch.linalg.vector_norm(merged, dim=1, keepdim=True) / math.sqrt(layer.in_features)
        torch.testing.assert_close(sigma.double(), expected, rtol=1e-6, atol=0)


def peak_bytes(fn) -> int:
    """The highest total of bytes that `fn` holds allocated at once on the CPU (torch's profiler, in event order),
    its result included."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    total = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += event.self_cpu_memory_usage
        peak = max(peak, total)
    del result
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_perturbed_weight_costs_one_weight_sized_buffer(dtype):
    """W + ε: one buffer the size of W, drawn in W's dtype and filled in place; σ's row norms: no tensor near W's
    size (blocks of rows). Measured here: W + ε 1x W's bytes, σ 1/8 (fp32) and 1/4 (bf16). The previous code drew ε in
    float32 and cast it (bf16: 3x W at peak) and formed the dense W + sΔW for σ (2x W in fp32, 6x in bf16)."""
    base = tiny_llama(hidden_size=64, intermediate_size=4096, num_attention_heads=4, num_key_value_heads=4).to(dtype)
    model = lorakit.adapt(base, lorakit.AdapterConfig(method="lora", r=4, targets=["down_proj"]))
    perturb_adapters(model, scale=0.3)
    name, layer = next(iter(lorakit.adapter_layers(model)))
    weight = layer.base_weight_linear()
    flat = FlatLora({"rho": 0.1})
    noise = flat.noise(layer, name, 0.05, state(model, 5))  # warm-up (lazy allocations of the first call)
    noise.perturbed(weight)
    sigma_peak = peak_bytes(lambda: flat.noise(layer, name, 0.05, state(model, 5)))
    perturbed_peak = peak_bytes(lambda: noise.perturbed(weight))
    print(f"{dtype}: W {weight.nbytes} B, sigma peak {sigma_peak} B, W + eps peak {perturbed_peak} B")
    assert sigma_peak <= weight.nbytes / 3, (sigma_peak, weight.nbytes)  # a float32 block of out/8 rows at a time
    assert weight.nbytes <= perturbed_peak <= weight.nbytes + 4096, (perturbed_peak, weight.nbytes)
    # and the forward's W + ε is the one from the sample: bit-equal to W + ε drawn separately
    assert torch.equal(noise.perturbed(weight), weight + noise.sample(dtype))


def test_same_seed_and_step_same_noise_else_different():
    model = adapted()
    name, layer = next(iter(lorakit.adapter_layers(model)))
    flat = FlatLora({})
    first = flat.draw(layer, name, 0.05, state(model, 3))
    assert torch.equal(first, flat.draw(layer, name, 0.05, state(model, 3)))  # resume, other processes
    assert not torch.equal(first, flat.draw(layer, name, 0.05, state(model, 4)))
    assert not torch.equal(first, flat.draw(layer, name, 0.05, state(model, 3, seed=1)))
    other_name, other = list(lorakit.adapter_layers(model))[1]
    assert not torch.equal(first[:4, :4], flat.draw(other, other_name, 0.05, state(model, 3))[:4, :4])


def test_rho_zero_and_the_first_step_add_no_noise(inputs):
    model = adapted()
    clean = model_output(model, inputs)
    FlatLora({"rho": 0.0}).before_step(state(model, 5))
    assert torch.equal(model_output(model, inputs), clean)
    FlatLora({}).before_step(state(model, 0))  # f(0) = 0
    assert torch.equal(model_output(model, inputs), clean)


@pytest.mark.parametrize("threads", [1, 2])
def test_before_step_fills_reused_buffers_with_the_same_noise_whatever_the_threads(threads):
    """before_step draws every layer's z (in parallel threads on a CPU, one generator per layer) into buffers it
    keeps from step to step: W + ε is bit-equal to the sequential W + sample(), and step 4 reuses step 3's memory."""
    model = adapted()
    flat, previous = FlatLora({}), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flat.before_step(state(model, 3))
        first = {name: layer.weight_noise.perturbed(layer.base_weight_linear()) for name, layer in lorakit.adapter_layers(model)}
        factor = noise_scale(3, 10) * 0.05  # f(t)·ρ, ρ's default
        for name, layer in lorakit.adapter_layers(model):
            expected = layer.base_weight_linear() + flat.draw(layer, name, factor, state(model, 3))
            assert torch.equal(first[name], expected), name
            assert first[name].data_ptr() == flat.buffers[name].data_ptr()
        pointers = {name: t.data_ptr() for name, t in first.items()}
        flat.after_backward(state(model, 3))
        flat.before_step(state(model, 4))
        for name, layer in lorakit.adapter_layers(model):
            again = layer.weight_noise.perturbed(layer.base_weight_linear())
            assert again.data_ptr() == pointers[name]  # the same buffer, refilled
            assert torch.equal(again, layer.base_weight_linear() + layer.weight_noise.sample(again.dtype))
    finally:
        torch.set_num_threads(previous)
