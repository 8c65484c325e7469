"""PRoLoRA specifics: parameter count, the rotated-chunk layout of A and B (against an independent loop and a
hand-computed case), LoRA as a special case, rectified init, gradients, options, PEFT export, files."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fresh_copy, model_output, perturb_adapters, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.methods.lora import LoraLayer
from lorakit.methods.prolora import ProloraLayer


def prolora(r=4, unshared=1, share_a=2, share_b=2, **kw):
    extra = dict(unshared=unshared, share_a=share_a, share_b=share_b)
    return lorakit.AdapterConfig(method="prolora", r=r, alpha=r, extra=extra, **kw)


def layer(in_features, out_features, seed=0, **options):
    torch.manual_seed(seed)
    return ProloraLayer(nn.Linear(in_features, out_features), prolora(**options), "layer")


def randomize(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=gen))


def expected_count(in_features, out_features, r, unshared, share_a, share_b):
    shared = r - unshared
    return shared * (math.ceil(in_features / share_a) + math.ceil(out_features / share_b)) + unshared * (
        in_features + out_features
    )


SHAPES = [(4, 1, 2, 2), (8, 1, 3, 5), (8, 0, 4, 1), (8, 8, 2, 2), (6, 2, 7, 3), (3, 0, 5, 5), (5, 1, 1, 1)]


@pytest.mark.parametrize("r,unshared,share_a,share_b", SHAPES)
def test_trained_parameter_count_equals_the_formula(r, unshared, share_a, share_b):
    module = layer(37, 23, r=r, unshared=unshared, share_a=share_a, share_b=share_b)  # 37, 23: prime widths
    count = sum(p.numel() for p in module.trainable_parameters().values())
    assert count == expected_count(37, 23, r, unshared, share_a, share_b)
    if r > unshared:
        assert tuple(module.A0.shape) == (r - unshared, math.ceil(37 / share_a))
        assert tuple(module.B0.shape) == (math.ceil(23 / share_b), r - unshared)


def test_model_summary_counts_the_formula_per_layer():
    model = lorakit.adapt(tiny_gpt2(), prolora(r=4, unshared=1, share_a=3, share_b=5))
    total = 0
    for name, module in lorakit.adapter_layers(model):
        count = sum(p.numel() for p in module.trainable_parameters().values())
        assert count == expected_count(module.in_features, module.out_features, 4, 1, 3, 5), name
        total += count
    assert lorakit.summary(model).trainable == total


def rotated_layout(chunk, share, features, rank_dim):
    """The shared part built by a plain loop: chunk k is torch.roll(chunk, -k·stride) along the rank axis."""
    shared = chunk.shape[rank_dim]
    step = max(shared // share, 1)
    hidden_dim = 1 - rank_dim
    parts = [torch.roll(chunk, -k * step, rank_dim) for k in range(share)]
    return torch.cat(parts, hidden_dim).narrow(hidden_dim, 0, features)


@pytest.mark.parametrize("r,unshared,share_a,share_b", SHAPES)
def test_built_factors_are_rotated_chunks_then_unshared(r, unshared, share_a, share_b):
    module = layer(37, 23, r=r, unshared=unshared, share_a=share_a, share_b=share_b)
    randomize(module)
    a, b = module.factors()
    shared = r - unshared
    assert a.shape == (r, 37) and b.shape == (23, r)
    if shared:
        assert torch.equal(a[:shared], rotated_layout(module.A0, share_a, 37, rank_dim=0))
        assert torch.equal(b[:, :shared], rotated_layout(module.B0, share_b, 23, rank_dim=1))
    if unshared:
        assert torch.equal(a[shared:], module.A_u) and torch.equal(b[:, shared:], module.B_u)
    delta = module.delta_weight()
    torch.testing.assert_close(delta, module.scale * b @ a)
    assert torch.linalg.matrix_rank(delta).item() <= r


def test_rotation_gives_full_rank_r_where_plain_copies_would_not():
    # m = n = 4 copies of a rank-4 chunk with no unshared rank: without rotation ΔW would still have rank 4 but
    # its 4 column blocks would be equal; with rotation the blocks differ
    module = layer(40, 24, r=4, unshared=0, share_a=4, share_b=4)
    randomize(module)
    a, _ = module.factors()
    blocks = a.split(10, dim=1)
    assert not any(torch.equal(blocks[0], other) for other in blocks[1:])
    assert torch.linalg.matrix_rank(module.delta_weight()).item() == 4


def set_factors(module, **values):
    with torch.no_grad():
        for name, value in values.items():
            getattr(module, name).copy_(torch.tensor(value, dtype=torch.float32))


def test_hand_computed_reference():
    module = layer(4, 4, r=2, unshared=0, share_a=2, share_b=2)  # shared rank 2, both strides max(2 // 2, 1) = 1
    set_factors(module, A0=[[1, 2], [3, 4]], B0=[[5, 6], [7, 8]])
    a, b = module.factors()
    # A: [A0 | A0 with its rank rows rolled up by one];  B: [B0 ; B0 with its rank columns rolled left by one]
    assert torch.equal(a, torch.tensor([[1.0, 2, 3, 4], [3, 4, 1, 2]]))
    assert torch.equal(b, torch.tensor([[5.0, 6], [7, 8], [6, 5], [8, 7]]))
    delta = torch.tensor([[23.0, 34, 21, 32], [31, 46, 29, 44], [21, 32, 23, 34], [29, 44, 31, 46]])
    assert torch.equal(module.delta_weight(), delta)  # alpha = r: scale 1


def test_hand_computed_reference_with_truncation_and_an_unshared_rank():
    # in 5 = 2 chunks of 3 truncated to 5; out 3 = 2 chunks of 2 truncated to 3; shared rank 2, strides 1
    module = layer(5, 3, r=3, unshared=1, share_a=2, share_b=2)
    set_factors(module, A0=[[1, 2, 3], [4, 5, 6]], A_u=[[7, 8, 9, 10, 11]], B0=[[1, 2], [3, 4]], B_u=[[1], [0], [-1]])
    a, b = module.factors()
    assert torch.equal(a, torch.tensor([[1.0, 2, 3, 4, 5], [4, 5, 6, 1, 2], [7, 8, 9, 10, 11]]))
    assert torch.equal(b, torch.tensor([[1.0, 2, 1], [3, 4, 0], [2, 1, -1]]))
    x = torch.tensor([[1.0, 0, 0, 0, 1]])
    # A x = [6, 6, 18];  B A x = [6 + 12 + 18, 18 + 24, 12 + 6 − 18] = [36, 42, 0]
    torch.testing.assert_close(module(x) - module.base_layer(x), torch.tensor([[36.0, 42, 0]]))


@pytest.mark.parametrize("unshared", [0, 4], ids=["m=n=1,u=0", "u=r"])
def test_special_cases_equal_a_lora_layer_with_the_same_factors(unshared):
    torch.manual_seed(0)
    base = nn.Linear(24, 40)
    ours = ProloraLayer(fresh_copy(base), prolora(r=4, unshared=unshared, share_a=1, share_b=1), "layer")
    lora = LoraLayer(fresh_copy(base), lorakit.AdapterConfig(method="lora", r=4, alpha=4), "layer")
    randomize(lora)
    a_name, b_name = ("A0", "B0") if unshared == 0 else ("A_u", "B_u")
    with torch.no_grad():
        getattr(ours, a_name).copy_(lora.A)
        getattr(ours, b_name).copy_(lora.B)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(ours(x), lora(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.delta_weight(), lora.delta_weight())


def test_init_leaves_output_unchanged_and_draws_a_from_the_rectified_bound():
    module = layer(256, 96, r=8, unshared=2, share_a=4, share_b=2)
    assert not module.B0.any() and not module.B_u.any()
    x = torch.randn(7, 256)
    assert torch.equal(module(x), module.base_layer(x))
    bound = 1 / math.sqrt(256)  # fan = in, not the chunk width 64 (whose bound would be twice as large)
    for values in (module.A0, module.A_u):
        assert values.abs().max() <= bound
        assert values.abs().max() > 0.95 * bound
        assert abs(values.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    assert not torch.equal(module.A0, module.A_u[:, :64])
    again = layer(256, 96, seed=5, r=8, unshared=2, share_a=4, share_b=2)  # seeded by (config seed, name) only
    assert torch.equal(again.A0, module.A0) and torch.equal(again.A_u, module.A_u)


def test_gaussian_init_has_std_one_over_r():
    module = layer(256, 96, r=8, unshared=4, share_a=2, share_b=2, init="gaussian")
    values = torch.cat([module.A0.flatten(), module.A_u.flatten()])
    assert abs(values.std().item() - 1 / 8) < 0.1 / 8


def test_gradients_reach_every_trained_factor_and_nothing_else(inputs):
    model = lorakit.adapt(tiny_gpt2(), prolora(r=6, unshared=2, share_a=3, share_b=5))
    perturb_adapters(model)  # B0, B_u start at zero: A0, A_u would get no gradient
    model_output(model, inputs).square().mean().backward()
    trained = set()
    for name, module in lorakit.adapter_layers(model):
        assert set(module.trainable_parameters()) == {"A0", "B0", "A_u", "B_u"}
        for key, param in module.trainable_parameters().items():
            assert param.grad is not None and param.grad.abs().sum() > 0, (name, key)
            trained.add(id(param))
    for name, param in model.named_parameters():
        if id(param) not in trained:
            assert param.grad is None and not param.requires_grad, name


def test_gradients_equal_those_through_the_loop_built_factors():
    module = layer(37, 23, r=6, unshared=2, share_a=3, share_b=2)
    randomize(module)
    x = torch.randn(4, 37)
    module(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in module.trainable_parameters().items()}
    leaves = {n: p.detach().clone().requires_grad_() for n, p in module.trainable_parameters().items()}
    a = torch.cat([rotated_layout(leaves["A0"], 3, 37, 0), leaves["A_u"]])
    b = torch.cat([rotated_layout(leaves["B0"], 2, 23, 1), leaves["B_u"]], 1)
    (module.base_layer(x) + module.scale * x @ a.T @ b.T).square().sum().backward()
    for name, leaf in leaves.items():
        torch.testing.assert_close(got[name], leaf.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "extra,key",
    [
        (dict(unshared=5), "unshared"),
        (dict(unshared=-1), "unshared"),
        (dict(unshared="one"), "unshared"),
        (dict(share_a=0), "share_a"),
        (dict(share_a="two"), "share_a"),
        (dict(share_b=1.5), "share_b"),
        (dict(share_b=0), "share_b"),
        (dict(shared=2), "shared"),
    ],
)
def test_bad_options_are_refused_in_one_line_naming_the_key(extra, key):
    with pytest.raises(lorakit.ConfigError, match=rf"option '?{key}") as info:
        lorakit.AdapterConfig(method="prolora", r=4, extra=extra)
    assert "\n" not in str(info.value)


def test_option_strings_from_the_cli_are_cast():
    config = lorakit.AdapterConfig(method="prolora", r=4, extra=dict(unshared="4", share_a="3", share_b="1"))
    assert (config.option("unshared"), config.option("share_a"), config.option("share_b")) == (4, 3, 1)
    defaults = lorakit.AdapterConfig(method="prolora", r=4)
    assert (defaults.option("unshared"), defaults.option("share_a"), defaults.option("share_b")) == (1, 2, 2)


OPTION_SETS = [dict(r=4, unshared=1, share_a=3, share_b=5), dict(r=4, unshared=0, share_a=7, share_b=2)]


@pytest.mark.parametrize("options", OPTION_SETS, ids=["u1-m3-n5", "u0-m7-n2"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_peft_export_gives_equal_logits(factory, options, tmp_path, inputs):
    peft = pytest.importorskip("peft")
    base = factory()
    model = lorakit.adapt(fresh_copy(base), prolora(**options))
    perturb_adapters(model)
    expected = model_output(model, inputs)
    lorakit.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_equals_forward_with_truncated_chunks(factory, inputs):
    model = lorakit.adapt(factory(), prolora(r=4, unshared=1, share_a=3, share_b=5))
    perturb_adapters(model)
    expected = model_output(model, inputs)
    lorakit.merge(model)
    torch.testing.assert_close(model_output(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_with_non_default_options(tmp_path, inputs):
    base = tiny_llama()
    model = lorakit.adapt(fresh_copy(base), prolora(r=6, unshared=2, share_a=3, share_b=5, seed=3))
    perturb_adapters(model)
    expected = model_output(model, inputs)
    lorakit.save_adapter(model, tmp_path / "adapter")
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")
    assert torch.equal(model_output(loaded, inputs), expected)
    for name, module in lorakit.adapter_layers(loaded):
        assert (module.unshared, module.share_a, module.share_b, module.r) == (2, 3, 5, 6), name
        original = model.get_submodule(name)
        for key, value in module.stored_tensors().items():
            assert torch.equal(value, getattr(original, key)), (name, key)


@pytest.mark.parametrize("unshared,names", [(0, {"A0", "B0"}), (4, {"A_u", "B_u"})], ids=["u=0", "u=r"])
def test_edge_ranks_keep_no_empty_tensors_and_round_trip(unshared, names, tmp_path, inputs):
    peft = pytest.importorskip("peft")
    base = tiny_gpt2()
    model = lorakit.adapt(fresh_copy(base), prolora(r=4, unshared=unshared, share_a=3, share_b=2))
    perturb_adapters(model)
    for name, module in lorakit.adapter_layers(model):
        assert set(module.trainable_parameters()) == set(module.stored_tensors()) == names, name
        assert {n for n, _ in module.named_parameters(recurse=False)} == names, name
    expected = model_output(model, inputs)
    lorakit.save_adapter(model, tmp_path / "adapter")
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")
    assert torch.equal(model_output(loaded, inputs), expected)
    lorakit.export_peft(model, tmp_path / "peft")
    exported = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(exported, inputs), expected, atol=1e-4, rtol=1e-4)
