"""Experts stored as 3-D parameters (transformers 5's Mixtral, Qwen3-MoE): never skipped without a word."""

from __future__ import annotations

import copy

import pytest
import torch
from architectures import llama, mixtral, qwen3_moe
from torch import nn

import lorakit
from lorakit.expert_parameters import expert_parameters

MOES = {"mixtral": mixtral, "qwen3-moe": qwen3_moe}


@pytest.fixture(scope="module", params=sorted(MOES))
def moe(request):
    return MOES[request.param]()


def test_expert_parameters_are_found_as_transformers_stores_them(moe):
    found = expert_parameters(moe)
    assert list(found) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    config = moe.config
    inner = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    assert found["model.layers.0.mlp.experts"] == {
        "gate_up_proj": (experts, 2 * inner, config.hidden_size),
        "down_proj": (experts, config.hidden_size, inner),
    }


def test_dense_models_and_convolutions_have_no_expert_parameters():
    model = llama()
    model.conv = nn.Conv1d(4, 4, 3)
    model.conv.num_experts = 4  # even with the attribute, a convolution kernel is not a stack of experts
    assert expert_parameters(model) == {}


def test_all_linear_says_the_experts_stay_frozen(moe):
    with pytest.warns(UserWarning) as record:
        model = lorakit.adapt(copy.deepcopy(moe), lorakit.AdapterConfig(r=4))
    messages = [str(w.message) for w in record if "expert" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    shapes = expert_parameters(moe)["model.layers.0.mlp.experts"]
    assert messages[0].startswith(
        "targets='all-linear' adapts linear layers only: the 4 3-D expert parameters of 2 mixture-of-experts modules "
        f"(e.g. model.layers.0.mlp.experts: gate_up_proj {' x '.join(map(str, shapes['gate_up_proj']))}, "
    )
    assert messages[0].endswith("are not linear layers and stay frozen")
    for name, param in model.named_parameters():  # true: the attention is adapted, the experts are frozen
        if ".experts." in name:
            assert not param.requires_grad, name
    assert any(".self_attn." in name for name, _ in lorakit.adapter_layers(model))


def test_a_regex_that_reaches_the_experts_warns_and_one_that_does_not_is_silent(moe, recwarn):
    lorakit.adapt(copy.deepcopy(moe), lorakit.AdapterConfig(r=4, targets=r".*\.self_attn\..*"))
    assert not [w for w in recwarn if "expert" in str(w.message)]
    with pytest.warns(UserWarning, match=r"^targets='\.\*' adapts linear layers only: the 4 3-D expert"):
        lorakit.adapt(copy.deepcopy(moe), lorakit.AdapterConfig(r=4, targets=".*"))


def test_dense_models_do_not_warn(recwarn):
    lorakit.adapt(llama(), lorakit.AdapterConfig(r=4))
    assert not [w for w in recwarn if "expert" in str(w.message)]


@pytest.mark.parametrize(
    "targets, start",
    [
        (["gate_up_proj"], "target 'gate_up_proj' is the 3-D expert parameter model.layers.0.mlp.experts.gate_up_proj"),
        (["q_proj", "experts.down_proj"], "target 'experts.down_proj' is the 3-D expert parameter "
         "model.layers.0.mlp.experts.down_proj"),
        (["experts"], "target 'experts' is the experts module model.layers.0.mlp.experts, whose experts are 3-D"),
    ],
    ids=["parameter", "parameter-suffix", "module"],
)
@pytest.mark.parametrize("method", ["lora", "loraxs", "mora"])
def test_targets_naming_experts_are_refused_in_one_line(moe, targets, start, method):
    model = copy.deepcopy(moe)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.ConfigError) as error:
        lorakit.adapt(model, lorakit.AdapterConfig(method=method, r=4, targets=targets))
    message = str(error.value)
    assert message.startswith(start) and "\n" not in message
    assert "in target_parameters (CLI: --target-parameters)" in message and message.endswith("target linear modules such as q_proj, k_proj, "
                                                                   "v_proj, o_proj, lm_head")
    assert not list(lorakit.adapter_layers(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_peft_adapter_on_expert_parameters_is_imported_whole_not_half(moe, tmp_path):
    """PEFT adapts the experts with target_parameters (per expert e: ΔW_e = B_e A_e, lora_A (E·r x in), lora_B
    (out x E·r)); importing only the attention part of such an adapter would silently drop the experts' update, so
    every experts module it names gets its LoRA (values: tests/test_expert_lora.py)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts.down_proj"])
    tuned = peft.get_peft_model(copy.deepcopy(moe), config)
    tuned.save_pretrained(tmp_path / "peft")
    model = lorakit.import_peft(copy.deepcopy(moe), tmp_path / "peft")
    experts = dict(lorakit.expert_lora.expert_loras(model))
    assert sorted(experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(module.params == ["down_proj"] for module in experts.values())
