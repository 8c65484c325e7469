"""LoRTA specifics (arXiv 2410.04060): one CP tensor for the whole model, its trained-parameter count, the per-head
block formula written out independently, rank, a hand-computed example, the authors' init, GQA, refusals, files
that store the shared factors once, and PEFT export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import fresh_copy, model_output, perturb_adapters, tiny_bert, tiny_gpt2, tiny_llama
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.inject import shared_parameters, trainable_parameters

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
KV = ("k_proj", "v_proj")
# tiny_llama: d = 32, H = 4 heads of d_h = 8, H_kv = 2 (GQA) unless overridden, L = 2 layers
D, D_H, H, H_KV, L = 32, 8, 4, 2, 2


def lorta(model, r=3, alpha=6.0, targets=None, **kwargs):
    config = lorakit.AdapterConfig(method="lorta", r=r, alpha=alpha, targets=targets or QKVO, **kwargs)
    return lorakit.adapt(model, config)


def factor_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in shared_parameters(model).named_parameters()}


def head_slice(h: int, d_h: int = D_H) -> slice:
    return slice(h * d_h, (h + 1) * d_h)


# ----------------------------------------------------------------------------------------------- 1, 10: counts

# (kv heads, targets, adapted layers L, adapted matrix kinds M, whether C_h and C_kv exist)
COUNT_CASES = {
    "gqa-qkvo": (H_KV, QKVO, L, 4, True, True),
    "gqa-qkvo-head_dim-4": (H_KV, QKVO, L, 4, True, True),  # config.head_dim = 4, not hidden / heads = 8
    "mha-qkvo": (H, QKVO, L, 4, True, False),
    "gqa-qv": (H_KV, ["q_proj", "v_proj"], L, 2, True, True),
    "gqa-qo": (H_KV, ["q_proj", "o_proj"], L, 2, True, False),
    "gqa-kv-only": (H_KV, ["k_proj", "v_proj"], L, 2, False, True),
    "mha-kv-only": (H, ["k_proj", "v_proj"], L, 2, True, False),
    "gqa-layer1-qv": (H_KV, r"model\.layers\.1\.self_attn\.(q|v)_proj", 1, 2, True, True),
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
@pytest.mark.parametrize("r", [3, 5])
def test_trained_parameter_count_is_the_cp_formula(case, r):
    kv_heads, targets, layers, kinds, has_c_h, has_c_kv = COUNT_CASES[case]
    d_h = 4 if "head_dim" in case else D_H
    model = lorta(tiny_llama(num_key_value_heads=kv_heads, head_dim=d_h), r=r, targets=targets)
    expected_shapes = {"A": (D, r), "B": (r, d_h), "C_l": (layers, r), "C_m": (kinds, r)}
    if has_c_h:
        expected_shapes["C_h"] = (H, r)
    if has_c_kv:
        expected_shapes["C_kv"] = (kv_heads, r)
    assert factor_shapes(model) == expected_shapes
    # r·(d + d_h + H + L + M) (+ r·H_kv with GQA; no r·H when nothing reads C_h)
    expected = r * (D + d_h + layers + kinds) + r * H * has_c_h + r * kv_heads * has_c_kv
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(p.numel() for p in trainable_parameters(model)) == expected
    summary = lorakit.summary(model)
    assert summary.trainable == expected
    assert sum(row[-1] for row in summary.rows) == expected
    for name, layer in lorakit.adapter_layers(model):  # nothing per layer: all of it is shared
        assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 0, name


def test_gqa_qkvo_count_written_out():
    model = lorta(tiny_llama(), r=4)
    assert lorakit.summary(model).trainable == 4 * (32 + 8 + 4 + 2 + 4) + 4 * 2 == 208


def test_smollm2_shaped_count_is_10976():
    """The docstring's SmolLM2-135M figure: d 576, d_h 64, H 9, H_kv 3, L 30, q/k/v/o, r = 16 (tiny MLP, vocab)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=576,
        intermediate_size=8,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=16,
    )
    model = lorta(LlamaForCausalLM(config), r=16, alpha=16)
    assert factor_shapes(model) == {
        "A": (576, 16),
        "B": (16, 64),
        "C_h": (9, 16),
        "C_l": (30, 16),
        "C_m": (4, 16),
        "C_kv": (3, 16),
    }
    assert lorakit.summary(model).trainable == 16 * (576 + 64 + 9 + 30 + 4 + 3) == 10_976
    assert len(list(lorakit.adapter_layers(model))) == 120


# ----------------------------------------------------------------------------------------------- 2: shared once


def test_shared_factors_exist_once(tmp_path, inputs):
    base = tiny_llama()
    model = lorta(fresh_copy(base))
    perturb_adapters(model)
    shared = model.lorakit_shared
    assert isinstance(shared, lorakit.layer.SharedParameters)
    layers = dict(lorakit.adapter_layers(model))
    assert len(layers) == 8
    assert all(layer.shared is shared for layer in layers.values())
    # only the owner registers them: no duplicates even when duplicates are not removed
    trained = [n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    assert sorted(trained) == sorted(f"lorakit_shared.{k}" for k in ("A", "B", "C_h", "C_l", "C_m", "C_kv"))
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert len(trainable_parameters(model)) == 6
    assert [k for k in model.state_dict() if k.startswith("lorakit_shared.")] == [
        f"lorakit_shared.{k}" for k in shared.stored
    ]
    assert not any(".shared." in k for k in model.state_dict())
    # a deep copy keeps one owner, read by every copied layer
    copied = fresh_copy(model)
    assert all(layer.shared is copied.lorakit_shared for _, layer in lorakit.adapter_layers(copied))
    assert copied.lorakit_shared is not shared

    expected = model_output(model, inputs)
    lorakit.save_adapter(model, tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter.safetensors", "pt") as handle:
        keys = sorted(handle.keys())
    assert keys == sorted(f"lorakit_shared.{k}" for k in ("A", "B", "C_h", "C_l", "C_m", "C_kv"))
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["shared"]["tensors"] == {k: list(v.shape) for k, v in shared.stored_tensors().items()}
    assert all(info["tensors"] == {} for info in meta["modules"].values())
    assert meta["trainable_parameters"] == 3 * (32 + 8 + 4 + 2 + 4 + 2)

    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")
    for key, value in shared.stored_tensors().items():
        assert torch.equal(getattr(loaded.lorakit_shared, key), value), key
    assert all(layer.shared is loaded.lorakit_shared for _, layer in lorakit.adapter_layers(loaded))
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-6, rtol=0)
    # moving the model moves the one owner every layer reads
    model.double()
    assert all(layer.shared.A.dtype == torch.float64 for _, layer in lorakit.adapter_layers(model))
    torch.testing.assert_close(model_output(model, inputs).float(), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- 3: the formula


def reference_delta(model, name: str) -> torch.Tensor:
    """s·ΔW of one module from the shared factors, head block by head block, in nn.Linear layout (out × in).

    transformers' LlamaAttention: q/k/v_proj map hidden -> heads·d_h and view their OUTPUT as (heads, d_h), so head
    h owns output rows h·d_h … (h+1)·d_h; o_proj maps heads·d_h -> hidden, so head h owns input columns h·d_h ….
    The block of head h is A·diag(C_h[h] ⊙ C_l[l] ⊙ C_m[m])·B (d × d_h: hidden × head): transposed for q/k/v.
    """
    t = model.lorakit_shared
    names = [n for n, _ in lorakit.adapter_layers(model)]
    layer_of = {n: int(n.split(".")[2]) for n in names}
    kind_of = {n: n.rsplit(".", 1)[-1] for n in names}
    rows_l = sorted(set(layer_of.values()))  # C_l: one row per adapted layer, in layer order
    rows_m = [m for m in QKVO if m in kind_of.values()]  # C_m: one row per adapted kind, q, k, v, o order
    kind = kind_of[name]
    heads = t.C_kv if kind in KV and hasattr(t, "C_kv") else t.C_h
    c_l, c_m = t.C_l[rows_l.index(layer_of[name])], t.C_m[rows_m.index(kind)]
    n_heads, d, d_h = heads.shape[0], t.A.shape[0], t.B.shape[1]
    delta = torch.zeros((d, n_heads * d_h) if kind == "o_proj" else (n_heads * d_h, d), dtype=t.A.dtype)
    for h in range(n_heads):
        block = t.A @ torch.diag(heads[h] * c_l * c_m) @ t.B
        assert block.shape == (d, d_h)
        if kind == "o_proj":
            delta[:, head_slice(h, d_h)] = block
        else:
            delta[head_slice(h, d_h), :] = block.T
    layer = model.get_submodule(name)
    return layer.scale * delta


@pytest.mark.parametrize(
    "kv_heads, head_dim, targets",
    [
        (H_KV, D_H, QKVO),
        (H, D_H, QKVO),
        (H_KV, 4, QKVO),  # config.head_dim 4: q maps 32 -> 16, o 16 -> 32
        (H_KV, D_H, ["q_proj", "v_proj"]),
        (H_KV, D_H, ["k_proj", "o_proj"]),
        (H_KV, D_H, r"model\.layers\.1\.self_attn\.(k|o)_proj"),  # C_l row 0 is layer 1
    ],
)
def test_delta_weight_equals_per_head_reference(kv_heads, head_dim, targets):
    base = tiny_llama(num_key_value_heads=kv_heads, head_dim=head_dim)
    model = lorta(base, targets=targets).double()  # float64: exact
    perturb_adapters(model, scale=0.5)
    assert all(p.abs().min() > 0 for p in trainable_parameters(model))  # every factor perturbed
    compared = 0
    for name, layer in lorakit.adapter_layers(model):
        expected = reference_delta(model, name)
        assert expected.shape == layer.base_layer.weight.shape, name
        assert expected.abs().max() > 1e-3, name
        torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-12, rtol=1e-10)
        # the forward path (fused low-rank GEMM) computes the same update
        x = torch.randn(5, layer.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(compared))
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ expected.T, atol=1e-12, rtol=1e-10)
        compared += 1
    assert compared == len(list(lorakit.adapter_layers(model)))


def test_heads_lie_on_the_outputs_of_q_k_v_and_the_inputs_of_o():
    """With every head coefficient zero but head j's, q/k/v change only head j's outputs and o reads only head j's
    inputs: checked through the modules' forward, not through the formula."""
    model = lorta(tiny_llama(num_key_value_heads=H)).double()
    perturb_adapters(model, scale=0.5)
    j = 2
    with torch.no_grad():
        keep = torch.zeros(H, 1, dtype=torch.float64)
        keep[j] = 1
        model.lorakit_shared.C_h.mul_(keep)
    x = torch.randn(7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kind in ("q_proj", "k_proj", "v_proj"):
        layer = model.get_submodule(f"model.layers.0.self_attn.{kind}")
        change = layer(x) - layer.base_layer(x)
        for h in range(H):
            assert (change[:, head_slice(h)].abs().max() > 1e-6) == (h == j), (kind, h)
    o_proj = model.get_submodule("model.layers.1.self_attn.o_proj")
    only_j = torch.zeros_like(x)
    only_j[:, head_slice(j)] = x[:, head_slice(j)]
    change = o_proj(x) - o_proj.base_layer(x)
    torch.testing.assert_close(change, o_proj(only_j) - o_proj.base_layer(only_j), atol=1e-12, rtol=0)
    assert change.abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------- 4: rank


@pytest.mark.parametrize("kv_heads", [H_KV, H])
@pytest.mark.parametrize("r", [3, 12])  # 12 > d_h: still rank r, not d_h
def test_rank_is_r_per_module(kv_heads, r):
    model = lorta(tiny_llama(num_key_value_heads=kv_heads), r=r, alpha=r).double()
    perturb_adapters(model, scale=0.5)
    for name, layer in lorakit.adapter_layers(model):
        delta = layer.delta_weight()
        assert min(delta.shape) > r
        assert torch.linalg.matrix_rank(delta).item() == r, name


# ----------------------------------------------------------------------------------------------- 5: by hand


def test_hand_computed_example():
    """d = 2, d_h = 1, H = 2 heads, L = 2, r = 1, alpha = 2 (s = 2): every block is the number c_h·B·A_i."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=2,
        intermediate_size=4,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8,
    )
    model = lorta(LlamaForCausalLM(config), r=1, alpha=2.0)
    t = model.lorakit_shared
    with torch.no_grad():
        t.A.copy_(torch.tensor([[1.0], [2.0]]))  # d × r
        t.B.copy_(torch.tensor([[3.0]]))  # r × d_h
        t.C_h.copy_(torch.tensor([[2.0], [-1.0]]))  # heads 0, 1
        t.C_l.copy_(torch.tensor([[1.0], [2.0]]))  # layers 0, 1
        t.C_m.copy_(torch.tensor([[1.0], [2.0], [3.0], [-1.0]]))  # q, k, v, o
    # q, layer 0: c = (2·1·1, -1·1·1) = (2, -1); row h = s·c_h·B·Aᵀ = 2·c_h·3·[1, 2]
    # k, layer 0: c = (4, -2); v, layer 1: c = (2·2·3, -1·2·3) = (12, -6)
    # o, layer 1: c = (2·2·-1, -1·2·-1) = (-4, 2); column h = s·A·c_h·B = 2·[1, 2]ᵀ·c_h·3
    expected = {
        "model.layers.0.self_attn.q_proj": [[12.0, 24.0], [-6.0, -12.0]],
        "model.layers.0.self_attn.k_proj": [[24.0, 48.0], [-12.0, -24.0]],
        "model.layers.1.self_attn.v_proj": [[72.0, 144.0], [-36.0, -72.0]],
        "model.layers.1.self_attn.o_proj": [[-24.0, 12.0], [-48.0, 24.0]],
    }
    for name, delta in expected.items():
        assert torch.equal(model.get_submodule(name).delta_weight(), torch.tensor(delta)), name


# ----------------------------------------------------------------------------------------------- 6: init


def kaiming_bound(a: float, fan_in: int) -> float:
    """torch.nn.init.kaiming_uniform_'s bound (leaky_relu gain), the authors' init for every factor but B."""
    return nn.init.calculate_gain("leaky_relu", a) * math.sqrt(3.0 / fan_in)


@pytest.mark.parametrize("init_scale", [0.0, 0.5, 1.0])
def test_init_is_the_authors_kaiming_uniform(init_scale):
    r = 64
    model = lorta(tiny_llama(), r=r, alpha=r, extra={"init_scale": init_scale} if init_scale else {})
    t = model.lorakit_shared
    a_bound = kaiming_bound(math.sqrt(5), r)
    c_bound = kaiming_bound(math.sqrt(5) * init_scale, r)
    assert a_bound == pytest.approx(1 / math.sqrt(r))
    assert c_bound == pytest.approx(math.sqrt(6 / ((1 + 5 * init_scale**2) * r)))
    if init_scale == 0:
        assert c_bound == pytest.approx(math.sqrt(6 / r))
    if init_scale == 1:
        assert c_bound == pytest.approx(1 / math.sqrt(r))
    for name, bound in (("A", a_bound), ("C_h", c_bound), ("C_l", c_bound), ("C_m", c_bound), ("C_kv", c_bound)):
        values = getattr(t, name).detach().flatten()
        assert values.numel() >= 128, name
        # uniform on (-bound, bound): inside, reaching near both ends, spread like a uniform
        assert values.abs().max() <= bound, name
        assert values.max() > 0.8 * bound and values.min() < -0.8 * bound, name
        assert abs(values.std().item() - bound / math.sqrt(3)) < 0.15 * bound, name
    assert torch.count_nonzero(t.B) == 0
    assert not torch.equal(t.C_h, t.C_m)  # each factor has its own stream


def test_init_is_seeded():
    first, second = lorta(tiny_llama()), lorta(tiny_llama())
    other = lorta(tiny_llama(), seed=1)
    for key in ("A", "C_h", "C_l", "C_m", "C_kv"):
        assert torch.equal(getattr(first.lorakit_shared, key), getattr(second.lorakit_shared, key)), key
        assert not torch.equal(getattr(first.lorakit_shared, key), getattr(other.lorakit_shared, key)), key


def test_output_unchanged_at_init_and_every_factor_trains_once_b_moves(inputs):
    base = tiny_llama()
    model = lorta(fresh_copy(base))
    torch.testing.assert_close(model_output(model, inputs), model_output(base, inputs), atol=0, rtol=0)
    t = model.lorakit_shared
    model_output(model, inputs).square().mean().backward()
    assert t.B.grad.abs().sum() > 0  # B = 0: only B moves at first ...
    for key in ("A", "C_h", "C_l", "C_m", "C_kv"):
        assert getattr(t, key).grad is None or getattr(t, key).grad.abs().sum() == 0, key
    with torch.no_grad():
        t.B.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    model_output(model, inputs).square().mean().backward()
    for key in ("A", "B", "C_h", "C_l", "C_m", "C_kv"):  # ... then every factor does
        grad = getattr(t, key).grad
        assert grad is not None and grad.abs().sum() > 0, key
        assert torch.count_nonzero(grad) == grad.numel(), key  # every row: every head, layer and kind is used
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("lorakit_shared."))


# ----------------------------------------------------------------------------------------------- 7: refusals


@pytest.mark.parametrize(
    "factory, targets, match",
    [
        (tiny_llama, ["q_proj", "gate_proj"], "gate_proj"),
        (tiny_llama, "all-linear", "q_proj, k_proj, v_proj, o_proj"),
        (tiny_gpt2, ["c_attn"], "c_attn"),
        (tiny_gpt2, "all-linear", "q_proj, k_proj, v_proj, o_proj"),
        (tiny_bert, ["query", "key", "value"], "query"),
        (tiny_bert, "all-linear", "q_proj, k_proj, v_proj, o_proj"),
    ],
    ids=["llama-mlp", "llama-all-linear", "gpt2-c_attn", "gpt2-all-linear", "bert-qkv", "bert-all-linear"],
)
def test_non_attention_targets_are_refused_before_the_model_is_touched(factory, targets, match):
    model = factory()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: type(m) for n, m in model.named_modules()}
    config = lorakit.AdapterConfig(method="lorta", r=4, targets=targets)
    with pytest.raises(lorakit.ConfigError, match=match) as error:
        lorakit.adapt(model, config)
    assert "\n" not in str(error.value)
    assert not list(lorakit.adapter_layers(model))
    assert shared_parameters(model) is None and not hasattr(model, "lorakit_shared")
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_other_refusals_are_one_line():
    with pytest.raises(lorakit.ConfigError, match="init_scale") as error:
        lorakit.AdapterConfig(method="lorta", init="gaussian", targets=QKVO)
    assert "\n" not in str(error.value)
    with pytest.raises(lorakit.ConfigError, match="init_scale"):
        lorakit.AdapterConfig(method="lorta", targets=QKVO, extra={"init_scale": -1})

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)

    class NoConfig(nn.Module):  # q_proj names, but no transformers config to read d, d_h, H, L from
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Attention()])

    model = NoConfig()
    with pytest.raises(lorakit.ConfigError, match="config") as error:
        lorakit.adapt(model, lorakit.AdapterConfig(method="lorta", targets=["q_proj"]))
    assert "\n" not in str(error.value)
    assert not list(lorakit.adapter_layers(model)) and not hasattr(model, "lorakit_shared")


# ----------------------------------------------------------------------------------------------- 8: PEFT export


@pytest.mark.parametrize("kv_heads, targets", [(H_KV, QKVO), (H, QKVO), (H_KV, ["q_proj", "v_proj"])])
def test_export_to_peft_gives_equal_logits(kv_heads, targets, tmp_path, inputs):
    peft = pytest.importorskip("peft")
    base = tiny_llama(num_key_value_heads=kv_heads)
    model = lorta(fresh_copy(base), r=3, alpha=6.0, targets=targets)
    perturb_adapters(model)
    expected = model_output(model, inputs)
    assert (expected - model_output(base, inputs)).abs().max() > 1e-3
    lorakit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 6.0
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["target_modules"] == sorted(targets)
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", "pt") as handle:
        for name, layer in lorakit.adapter_layers(model):
            a = handle.get_tensor(f"base_model.model.{name}.lora_A.weight")
            b = handle.get_tensor(f"base_model.model.{name}.lora_B.weight")
            assert a.shape == (3, layer.in_features) and b.shape == (layer.out_features, 3), name
            torch.testing.assert_close(layer.scale * b @ a, layer.delta_weight(), atol=1e-6, rtol=1e-5)
    loaded = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- 9: GQA


def deltas(model) -> dict[str, torch.Tensor]:
    return {name: layer.delta_weight().clone() for name, layer in lorakit.adapter_layers(model)}


@pytest.mark.parametrize("kv_heads", [H_KV, 1])
def test_gqa_k_and_v_read_their_own_head_factor(kv_heads, inputs):
    model = lorta(tiny_llama(num_key_value_heads=kv_heads))
    perturb_adapters(model)
    t = model.lorakit_shared
    assert t.C_kv.shape == (kv_heads, 3) and t.C_h.shape == (H, 3)
    for name, layer in lorakit.adapter_layers(model):
        assert layer.out_features == (kv_heads * D_H if name.endswith(KV) else D), name
    before = deltas(model)
    with torch.no_grad():
        t.C_h.mul_(2)
    after = deltas(model)
    for name in before:  # C_h moves q and o only
        assert torch.equal(after[name], before[name]) == name.endswith(KV), name
    with torch.no_grad():
        t.C_kv.mul_(3)
    last = deltas(model)
    for name in before:  # C_kv moves k and v only
        assert torch.equal(last[name], after[name]) != name.endswith(KV), name
    model_output(model, inputs).square().mean().backward()  # the attention runs with the repeated kv heads
    assert t.C_kv.grad.abs().sum() > 0


def test_without_gqa_k_and_v_read_c_h():
    model = lorta(tiny_llama(num_key_value_heads=H))
    perturb_adapters(model)
    t = model.lorakit_shared
    assert not hasattr(t, "C_kv") and "C_kv" not in t.stored
    before = deltas(model)
    with torch.no_grad():
        t.C_h[1].mul_(2)
    after = deltas(model)
    assert all(not torch.equal(after[name], before[name]) for name in before)


# ----------------------------------------------------------------------------------------------- fused qkv (Phi-3)


def test_fused_qkv_gets_the_stacked_q_k_v_updates_of_separate_projections(inputs):
    """Phi-3's qkv_proj outputs [q | k | v]: its ΔW is the q_proj, k_proj and v_proj updates of a Llama with the same
    shapes and the same shared factors, stacked; o_proj's is o_proj's. The whole model then trains and exports."""
    from architectures import llama, phi3

    fused = lorta(phi3(), targets=["qkv_proj", "o_proj"])
    separate = lorta(llama(), targets=QKVO)
    assert factor_shapes(fused) == factor_shapes(separate)  # one C_m row each for q, k, v, o; C_kv for GQA
    perturb_adapters(fused)
    perturb_adapters(separate)
    ref = deltas(separate)
    for name, delta in deltas(fused).items():
        prefix, matrix = name.rsplit(".", 1)
        if matrix == "qkv_proj":
            stacked = torch.cat([ref[f"{prefix}.{m}"] for m in ("q_proj", "k_proj", "v_proj")])
            torch.testing.assert_close(delta, stacked, atol=0, rtol=0)
            assert torch.linalg.matrix_rank(delta) <= 3
        else:
            torch.testing.assert_close(delta, ref[name], atol=0, rtol=0)
    model_output(fused, inputs).square().mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in trainable_parameters(fused))


def test_fused_qkv_and_a_separate_projection_of_the_same_layer_are_refused():
    from architectures import phi3

    model = phi3()
    attention = model.model.layers[0].self_attn
    attention.q_proj = nn.Linear(D, H * D_H, bias=False)  # a model with both (none does): LoRTA cannot index both
    with pytest.raises(lorakit.ConfigError, match="both layer 0 q_proj"):
        lorta(model, targets=["qkv_proj", "q_proj", "o_proj"])


def test_phi3_all_linear_hint_names_the_fused_targets():
    from architectures import phi3

    with pytest.raises(lorakit.ConfigError, match="gate_up_proj.*qkv_proj,o_proj where q, k and v are fused"):
        lorta(phi3(), targets="all-linear")
