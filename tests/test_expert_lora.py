"""LoRA on 3-D expert parameters (`AdapterConfig(target_parameters=...)`, lorakit.expert_lora), against PEFT's
`target_parameters` (0.21 and 0.22) as the oracle, PEFT export and import included, on transformers 5's Mixtral and Qwen3-MoE (experts as stacked parameters)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import safetensors.torch
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
    with pytest.raises(lorakit.ConfigError, match="belong to a model's first adapter only"):
        lorakit.adapt(model, _config(), name="second")
    from lorakit.procedures import PROCEDURES

    with pytest.raises(lorakit.ConfigError, match="procedure flat works on the linear adapter layers"):
        PROCEDURES["flat"]({}).check(model)
    assert isinstance(dict(expert_loras(model))["model.layers.0.mlp.experts"], ExpertLoRA)


def _peft_logits(moe, directory):
    peft = pytest.importorskip("peft")
    return _logits(peft.PeftModel.from_pretrained(copy.deepcopy(moe), directory).eval())


@pytest.mark.parametrize("params", [EXPERT_PARAMS, EXPERT_PARAMS[::-1], ["experts.down_proj"]],
                         ids=["both", "both-reversed", "one"])  # fmt: skip
def test_peft_export_loads_in_peft_with_equal_logits(moe, params, tmp_path):
    """PEFT nests one wrapper per parameter in the module's own parameter order, whatever order the config names
    them in: the file keys follow that order (expert_lora.peft_key)."""
    model = _adapted(moe, target_parameters=params)
    lorakit.export_peft(model, tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert len(written["target_parameters"]) == 2 * len(params)  # full names, two layers
    assert (_logits(model) - _logits(moe)).abs().max() > 1e-3
    torch.testing.assert_close(_peft_logits(moe, tmp_path / "peft"), _logits(model), rtol=0, atol=1e-5)


def test_peft_export_with_another_expert_rank_writes_a_rank_pattern(moe, tmp_path):
    model = _adapted(moe)
    experts = dict(expert_loras(model))
    for name, module in experts.items():  # the experts at rank 3, the attention at rank 2
        wider = ExpertLoRA(module.original, name, module.params, 3, module.scale)
        wider.initialize(1)
        with torch.no_grad():
            for key in wider.params:
                wider.B[key].normal_(0, 0.05)
        lorakit.swap.set_module(model, name, wider)
    lorakit.export_peft(model, tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {written["r"], *written["rank_pattern"].values()} == {2, 3}  # the most common rank is the default
    torch.testing.assert_close(_peft_logits(moe, tmp_path / "peft"), _logits(model), rtol=0, atol=1e-5)


def test_import_of_peft_target_parameters_gives_peft_logits_and_saves(moe, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERT_PARAMS)
    theirs = peft.get_peft_model(copy.deepcopy(moe), config)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorakit.import_peft(copy.deepcopy(moe), tmp_path / "peft").eval()
    assert sorted(dict(expert_loras(ours))) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    expected = _logits(theirs.eval())
    assert (expected - _logits(moe)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=1e-5)
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert torch.equal(_logits(lorakit.load_adapter(copy.deepcopy(moe), tmp_path / "ours").eval()), _logits(ours))


def test_import_refuses_a_target_parameters_file_that_does_not_fit(moe, tmp_path):
    model = _adapted(moe)
    lorakit.export_peft(model, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    key = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"
    tensors[key] = tensors[key][:-1]
    safetensors.torch.save_file(tensors, weights)
    with pytest.raises(lorakit.AdapterFileError, match=r"experts.down_proj needs lora_A \(8, \d+\) .*; the file has \(7, "):
        lorakit.import_peft(copy.deepcopy(moe), tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    written["target_modules"], written["target_parameters"] = None, ["experts.up_proj"]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(written))
    with pytest.raises(lorakit.AdapterFileError, match="'experts.up_proj' matches no 3-D expert parameter"):
        lorakit.import_peft(copy.deepcopy(moe), tmp_path / "peft")
