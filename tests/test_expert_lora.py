"""LoRA on 3-D expert parameters (`AdapterConfig(target_parameters=...)`, lorakit.expert_lora), against PEFT 0.21's
`target_parameters` as the oracle, on transformers 5's Mixtral and Qwen3-MoE (experts as stacked parameters)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from architectures import mixtral, qwen3_moe

import lorakit
from lorakit.expert_lora import ExpertLoRA, expert_loras

MOES = {"mixtral": mixtral, "qwen3-moe": qwen3_moe}
EXPERT_PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=sorted(MOES))
def moe(request):
    return MOES[request.param]().eval()


def _config(**overrides):
    values = dict(r=2, alpha=4, targets=["q_proj"], target_parameters=EXPERT_PARAMS, seed=3)
    return lorakit.AdapterConfig(**(values | overrides))


def _adapted(moe, **overrides):
    model = lorakit.adapt(copy.deepcopy(moe), _config(**overrides))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in lorakit.inject.trainable_parameters(model):
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_every_expert_parameter_gets_a_lora_and_the_output_is_unchanged_at_init(moe):
    model = lorakit.adapt(copy.deepcopy(moe), _config())
    modules = dict(expert_loras(model))
    assert list(modules) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = modules["model.layers.0.mlp.experts"]
    count, out, inp = experts.original.gate_up_proj.shape
    assert experts.A["gate_up_proj"].shape == (count, 2, inp) and experts.B["gate_up_proj"].shape == (count, out, 2)
    assert all(experts.B[key].abs().max() == 0 and experts.A[key].abs().max() > 0 for key in experts.params)
    assert torch.equal(_logits(model), _logits(moe))
    assert not any(p.requires_grad for p in experts.original.parameters())


def test_equals_peft_target_parameters_with_equal_factors(moe):
    peft = pytest.importorskip("peft")
    ours = _adapted(moe)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS)
    theirs = peft.get_peft_model(copy.deepcopy(moe), config).eval()
    copied = 0
    with torch.no_grad():
        for name, module in theirs.named_modules():
            target = name.removeprefix("base_model.model.")
            key = getattr(module, "parameter_name", None)
            if key is not None:  # PEFT's ParamWrapper: lora_A (E·r x in), lora_B (out x E·r), B_e = [:, e::E]
                owner = target.split(".base_layer")[0]
                experts = dict(expert_loras(ours))[owner]
                a, b = experts.A[key], experts.B[key]
                module.lora_A["default"].weight.copy_(a.reshape(-1, a.shape[-1]))
                module.lora_B["default"].weight.copy_(b.permute(1, 2, 0).reshape(b.shape[1], -1))
                copied += 1
            elif target.endswith("q_proj") and hasattr(module, "lora_A"):
                layer = dict(lorakit.adapter_layers(ours))[target]
                module.lora_A["default"].weight.copy_(layer.A)
                module.lora_B["default"].weight.copy_(layer.B)
    assert copied == 4  # two parameters in each of two layers
    expected = _logits(theirs)
    assert (expected - _logits(moe)).abs().max() > 1e-3  # the experts' update is really there
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=1e-5)


def test_a_train_step_moves_the_expert_factors_and_never_the_experts(moe):
    model = _adapted(moe).train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "original" in k or "base_layer" in k}
    trained = {id(p): p.detach().clone() for p in lorakit.inject.trainable_parameters(model)}
    optimizer = torch.optim.SGD(lorakit.inject.trainable_parameters(model), lr=0.5)
    model(IDS, labels=IDS).loss.backward()
    optimizer.step()
    experts = [p for _, m in expert_loras(model) for p in m.trainable_parameters().values()]
    assert all(not torch.equal(p, trained[id(p)]) for p in experts)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())


def test_disabled_unload_and_merge_and_unload(moe):
    model = _adapted(moe)
    adapted = _logits(model)
    with lorakit.disabled(model):
        assert torch.equal(_logits(model), _logits(moe))
    merged = lorakit.merge_and_unload(copy.deepcopy(model))
    assert not list(expert_loras(merged)) and not lorakit.inject.is_adapted(merged)
    torch.testing.assert_close(_logits(merged), adapted, rtol=0, atol=1e-5)
    plain = lorakit.unload(model)
    assert not list(expert_loras(plain))
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in plain.state_dict().items())


def test_save_load_is_exact_and_the_base_check_covers_the_experts(moe, tmp_path):
    model = _adapted(moe)
    lorakit.save_adapter(model, tmp_path / "a")
    loaded = lorakit.load_adapter(copy.deepcopy(moe), tmp_path / "a").eval()
    assert torch.equal(_logits(loaded), _logits(model))
    rows = {row[0]: row[4] for row in lorakit.summary(loaded).rows}
    experts = dict(expert_loras(loaded))["model.layers.0.mlp.experts"]
    label = "model.layers.0.mlp.experts (gate_up_proj, down_proj: LoRA per expert)"
    assert rows[label] == sum(p.numel() for p in experts.trainable_parameters().values())
    other = copy.deepcopy(moe)
    with torch.no_grad():
        other.model.layers[1].mlp.experts.down_proj.mul_(1.5)  # only an expert parameter differs
    with pytest.raises(lorakit.BaseModelMismatchError, match="different expert weights"):
        lorakit.load_adapter(copy.deepcopy(other), tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.load_adapter(other, tmp_path / "a", strict=False)
    assert any("different expert weights" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(method="loraxs"), "target_parameters is LoRA's"),
        (dict(target_parameters=["experts.up_proj"]), "matches no 3-D expert parameter; this model has: "),
    ],
)
def test_bad_target_parameters_are_refused_before_anything_changes(moe, overrides, match):
    model = copy.deepcopy(moe)
    with pytest.raises(lorakit.ConfigError, match=match):
        lorakit.adapt(model, _config(**overrides))
    assert not lorakit.inject.is_adapted(model) and not list(expert_loras(model))


def test_what_does_not_take_an_expert_lora_refuses_it(moe, tmp_path):
    model = _adapted(moe)
    with pytest.raises(lorakit.ConfigError, match="does not export to PEFT yet"):
        lorakit.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(lorakit.ConfigError, match="belong to a model's first adapter only"):
        lorakit.adapt(model, _config(), name="second")
    from lorakit.procedures import PROCEDURES

    with pytest.raises(lorakit.ConfigError, match="procedure flat works on the linear adapter layers"):
        PROCEDURES["flat"]({}).check(model)
    assert isinstance(dict(expert_loras(model))["model.layers.0.mlp.experts"], ExpertLoRA)
