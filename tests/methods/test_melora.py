"""MELoRA specifics: LoRA's parameter count at rank n·r, the block-diagonal structure (against a hand-computed ΔW),
blocks=1 is LoRA, refusals, PEFT export as an exact rank-n·r LoRA, half precision, save/load with blocks=4."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fresh_copy, model_output, perturb_adapters, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.methods.melora import MeloraLayer


def melora(blocks, r=4, **kw):
    return lorakit.AdapterConfig(method="melora", r=r, alpha=2 * r, extra={"blocks": blocks}, **kw)


def blocks_of(delta, n):
    """delta (out x in) cut into its n x n grid of (out/n x in/n) blocks: grid[i][j]."""
    rows = delta.chunk(n, dim=0)
    return [row.chunk(n, dim=1) for row in rows]


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_trainable_count_is_lora_count_at_rank_r(blocks):
    model = lorakit.adapt(tiny_llama(), melora(blocks))
    layers = dict(lorakit.adapter_layers(model))
    assert len(layers) == 14
    for name, layer in layers.items():
        count = sum(p.numel() for p in layer.trainable_parameters().values())
        assert count == 4 * (layer.in_features + layer.out_features), name
        assert layer.A.shape == (blocks, 4, layer.in_features // blocks)
        assert layer.B.shape == (blocks, layer.out_features // blocks, 4)


@pytest.mark.parametrize("blocks", [1, 4])
def test_init_is_kaiming_uniform_with_the_block_fan_in(blocks):
    model = lorakit.adapt(tiny_llama(hidden_size=64, intermediate_size=128), melora(blocks, r=8))
    for name, layer in lorakit.adapter_layers(model):
        bound = (layer.in_features // blocks) ** -0.5
        assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound, name
        assert torch.equal(layer.B, torch.zeros_like(layer.B)), name
        assert not torch.equal(layer.A[0], layer.A[-1]) or blocks == 1, name  # blocks drawn independently


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("blocks,r", [(2, 3), (4, 3), (4, 10)])  # r=10 exceeds some blocks' widths: rank < n·r
def test_delta_is_block_diagonal_of_rank_n_r(factory, blocks, r):
    model = lorakit.adapt(factory(), melora(blocks, r=r))
    perturb_adapters(model, scale=1.0)
    for name, layer in lorakit.adapter_layers(model):
        delta = layer.delta_weight()
        delta = delta.T if layer.fan_in_fan_out else delta  # Conv1D stores in x out
        assert delta.shape == (layer.out_features, layer.in_features)
        grid = blocks_of(delta, blocks)
        for i in range(blocks):
            for j in range(blocks):
                if i != j:
                    assert torch.equal(grid[i][j], torch.zeros_like(grid[i][j])), (name, i, j)
            want = layer.scale * layer.B[i] @ layer.A[i]
            torch.testing.assert_close(grid[i][i], want, atol=1e-6, rtol=1e-5)
        generic = blocks * min(r, layer.in_features // blocks, layer.out_features // blocks)
        assert torch.linalg.matrix_rank(delta).item() == generic <= blocks * r, name


def toy_layer(dropout=0.0):
    """in = out = 4, n = 2, r = 1, s = alpha / r = 2, zero base weight: the output is ΔW x."""
    config = lorakit.AdapterConfig(method="melora", r=1, alpha=2, dropout=dropout, extra={"blocks": 2})
    base = nn.Linear(4, 4, bias=False)
    nn.init.zeros_(base.weight)
    layer = MeloraLayer(base, config, "toy")
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]]]))  # A_1 = [1 2], A_2 = [3 -1]
        layer.B.copy_(torch.tensor([[[2.0], [1.0]], [[-1.0], [4.0]]]))  # B_1 = [2 1]ᵀ, B_2 = [-1 4]ᵀ
    return layer


def test_hand_computed_reference():
    layer = toy_layer()
    # s · blockdiag(B_1 A_1, B_2 A_2) = 2 · blockdiag([[2, 4], [1, 2]], [[-3, 1], [12, -4]])
    expected = torch.tensor(
        [
            [4.0, 8.0, 0.0, 0.0],
            [2.0, 4.0, 0.0, 0.0],
            [0.0, 0.0, -6.0, 2.0],
            [0.0, 0.0, 24.0, -8.0],
        ]
    )
    assert torch.equal(layer.delta_weight(), expected)
    one_hot = torch.eye(4)  # row j is e_j, so the output's row j is column j of ΔW
    assert torch.equal(layer(one_hot), expected.T)
    assert torch.equal(layer(one_hot.view(2, 2, 4)), expected.T.reshape(2, 2, 4))  # any leading shape


def test_dropout_applies_to_the_adapter_input_only():
    layer = toy_layer(dropout=0.5).train()
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.arange(16.0).view(4, 4))
    x = torch.randn(6, 4)
    torch.manual_seed(0)
    got = layer(x)
    torch.manual_seed(0)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    want = x @ layer.base_layer.weight.T + dropped @ layer.delta_weight().T
    torch.testing.assert_close(got, want)


def test_one_block_is_lora(inputs):
    base = tiny_llama()
    ours = lorakit.adapt(fresh_copy(base), melora(1, r=4))
    lora = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="lora", r=4, alpha=8))
    for name, layer in lorakit.adapter_layers(ours):  # the same init, drawn from the same generator
        assert torch.equal(layer.A[0], lora.get_submodule(name).A), name
    perturb_adapters(lora, scale=0.3)
    for name, layer in lorakit.adapter_layers(ours):
        reference = lora.get_submodule(name)
        with torch.no_grad():
            layer.A.copy_(reference.A[None])
            layer.B.copy_(reference.B[None])
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
        assert torch.equal(layer(x), reference(x)), name
    assert torch.equal(model_output(ours, inputs), model_output(lora, inputs))


def test_blocks_not_dividing_a_width_are_refused_before_touching_the_model():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.ConfigError) as info:
        lorakit.adapt(model, melora(3))
    message = str(info.value)
    assert "\n" not in message
    assert "blocks=3" in message and "model.layers.0.self_attn.q_proj (32 -> 32)" in message
    assert "use blocks=2" in message
    assert not list(lorakit.adapter_layers(model))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_out_width_not_divisible_is_refused():
    # q_proj (32 -> 32) fits 32 blocks; k_proj (32 -> 16) does not
    with pytest.raises(lorakit.ConfigError, match=r"model\.layers\.0\.self_attn\.k_proj \(32 -> 16\); use blocks=16"):
        lorakit.adapt(tiny_llama(), melora(32, r=1))


@pytest.mark.parametrize("value", [0, -2, "x", 1.5, True, None])
def test_invalid_blocks_value_is_a_one_line_error_naming_the_key(value):
    with pytest.raises(lorakit.ConfigError, match="option blocks=") as info:
        melora(value)
    assert "\n" not in str(info.value)


def test_unknown_option_is_refused():
    with pytest.raises(lorakit.ConfigError, match="'block' is unknown for method melora; its options are: blocks"):
        lorakit.AdapterConfig(method="melora", extra={"block": 2})


def test_cli_string_is_cast():
    assert lorakit.AdapterConfig(method="melora", extra={"blocks": "4"}).option("blocks") == 4
    assert lorakit.AdapterConfig(method="melora").option("blocks") == 2


@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_peft_export_is_the_exact_rank_n_r_lora(factory, rslora, tmp_path, inputs):
    peft = pytest.importorskip("peft")
    base = factory()
    model = lorakit.adapt(fresh_copy(base), melora(2, r=4, rslora=rslora))
    perturb_adapters(model)
    expected = model_output(model, inputs)
    lorakit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and not config["rank_pattern"] and not config["alpha_pattern"]
    scale = next(iter(lorakit.adapter_layers(model)))[1].scale
    peft_scale = config["lora_alpha"] / (8**0.5 if rslora else 8)
    assert peft_scale == pytest.approx(scale)
    loaded = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-4, rtol=1e-4)


def test_half_precision_base(inputs):
    base = tiny_llama().to(torch.bfloat16)
    model = lorakit.adapt(fresh_copy(base), melora(2))
    perturb_adapters(model)
    for _, layer in lorakit.adapter_layers(model):
        assert layer.A.dtype == layer.B.dtype == torch.float32
    out = model_output(model, inputs)
    assert out.dtype == torch.bfloat16
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    update = (x.float() @ layer.delta_linear().T).to(torch.bfloat16)
    assert update.abs().mean() > 0.1  # large enough that a wrong scale or block order shows
    torch.testing.assert_close(layer(x), layer.base_layer(x) + update, atol=2e-2, rtol=2e-2)
    out.float().square().mean().backward()
    for name, layer in lorakit.adapter_layers(model):
        for param in layer.trainable_parameters().values():
            assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_save_load_round_trip_with_four_blocks(factory, tmp_path, inputs):
    base = factory()
    model = lorakit.adapt(fresh_copy(base), melora(4))
    perturb_adapters(model)
    expected = model_output(model, inputs)
    lorakit.save_adapter(model, tmp_path / "adapter")
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")
    assert all(layer.blocks == 4 for _, layer in lorakit.adapter_layers(loaded))
    assert torch.equal(model_output(loaded, inputs), expected)
    lorakit.merge(loaded)  # merge from the block diagonal, with four blocks and Conv1D's layout
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-5, rtol=1e-5)
