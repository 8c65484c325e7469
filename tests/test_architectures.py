"""The contract of every method on every architecture of `architectures.py` (tiny random models, no download).

One case is (architecture, method variant); it checks, in order: the output is unchanged at init, every adapted
layer keeps its base type and the output head is left alone, merge equals the unmerged forward and unmerge restores
the weights, `disabled()` gives the base, a train step moves only the declared parameters, `unload()` restores the
base weights; then save and load, and PEFT export (where the update is low rank) with equal logits in PEFT.
The models run on one thread: for models this small that is several times faster than contended threads.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from architectures import ARCHITECTURES, VOCAB
from conftest import VARIANTS, make_config, perturb_adapters

import lorakit
from lorakit.inject import trainable_parameters

peft = pytest.importorskip("peft")

LLAMA_ATTENTION = {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "mixtral", "qwen3-moe"}
# LoRTA's tensor indexes q/k/v/o projections (or Phi-3's fused qkv_proj); these have none (refusal tested below)
LORTA_REFUSED = {
    "gpt2": "transformer.h.0.attn.c_attn",
    "bert": "bert.encoder.layer.0.attention.self.query",
    "modernbert": "model.layers.0.attn.Wqkv",
}
assert set(ARCHITECTURES) == LLAMA_ATTENTION | {"phi3"} | set(LORTA_REFUSED)
assert {VARIANTS[v]["method"] for v in VARIANTS} == set(lorakit.METHODS)
# one variant per method (tests/test_contract.py runs LoRA-Mini's other outer matrices on Llama, GPT-2 and BERT),
# and MoRA's both kinds: "sharing" is low rank (exported to PEFT), the default RoPE kind is not (export refused)
METHOD_VARIANTS = [v for v in VARIANTS if not v.startswith("mini-")] + ["mini-orthonormal"]
CASES = [(a, v) for a in ARCHITECTURES for v in METHOD_VARIANTS if not (v == "lorta" and a in LORTA_REFUSED)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bases():
    built = {}

    def get(arch):
        if arch not in built:
            built[arch] = ARCHITECTURES[arch]()
        return built[arch]

    return get


def adapt(arch, base, variant):
    config = make_config(variant, **({"targets": ["qkv_proj", "o_proj"]} if (arch, variant) == ("phi3", "lorta") else {}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="targets='all-linear' adapts linear layers only")  # MoE experts
        return lorakit.adapt(copy.deepcopy(base), config)


def logits(model, inputs):
    return model(inputs).logits


INPUTS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("arch", "variant"), CASES, ids=[f"{a}-{v}" for a, v in CASES])
def test_contract(arch, variant, bases):
    base = bases(arch)
    expected = logits(base, INPUTS)
    model = adapt(arch, base, variant)
    torch.testing.assert_close(logits(model, INPUTS), expected, atol=1e-5, rtol=1e-5)  # exact init

    layers = dict(lorakit.adapter_layers(model))
    assert layers
    head = base.get_output_embeddings()
    for name, layer in layers.items():
        assert type(layer.base_layer) is type(base.get_submodule(name))
        assert base.get_submodule(name) is not head, name
        assert layer.delta_weight().shape == layer.base_layer.weight.shape

    perturb_adapters(model)
    adapted = logits(model, INPUTS)
    assert (adapted - expected).abs().max() > 1e-4  # the perturbed adapters do change the output
    weights = {n: layer.base_layer.weight.clone() for n, layer in layers.items()}
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, INPUTS), adapted, atol=1e-5, rtol=1e-5)
    with lorakit.disabled(model):
        torch.testing.assert_close(logits(model, INPUTS), expected, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, INPUTS), adapted, atol=1e-5, rtol=1e-5)

    # one train step: gradients reach every declared parameter and nothing else, and the step changes the output
    declared = {id(p) for p in trainable_parameters(model)}
    assert all(p.requires_grad == (id(p) in declared) for p in model.parameters())
    model.train()
    loss = torch.nn.functional.cross_entropy(logits(model, INPUTS).flatten(0, 1), INPUTS.flatten())
    loss.backward()
    for name, param in model.named_parameters():
        if id(param) in declared:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    torch.optim.SGD(trainable_parameters(model), lr=0.1).step()
    model.eval()
    assert (logits(model, INPUTS) - adapted).abs().max() > 1e-6

    plain = lorakit.unload(model)
    restored, original = plain.state_dict(), base.state_dict()
    assert restored.keys() == original.keys()
    for key, value in original.items():  # merged and unmerged above: exact up to one rounding
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("arch", "variant"), CASES, ids=[f"{a}-{v}" for a, v in CASES])
def test_save_load_and_peft_export(arch, variant, bases, tmp_path):
    base = bases(arch)
    model = adapt(arch, base, variant)
    perturb_adapters(model)
    adapted = logits(model, INPUTS)
    lorakit.save_adapter(model, tmp_path / "adapter")
    loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, INPUTS), adapted, atol=1e-6, rtol=0)
    if any(layer.export_factors() is None for _, layer in lorakit.adapter_layers(model)):
        with pytest.raises(lorakit.ConfigError, match="not low rank"):  # MoRA (RoPE): refused, nothing written
            lorakit.export_peft(model, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
        return
    lorakit.export_peft(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] == (arch == "gpt2")
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(in_peft, INPUTS), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(LORTA_REFUSED))
def test_lorta_refuses_models_without_separate_qkvo(arch, bases):
    base = bases(arch)
    with pytest.raises(lorakit.ConfigError, match=f"^lorta cannot adapt {LORTA_REFUSED[arch]}:") as err:
        lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(method="lorta", r=4))
    assert "\n" not in str(err.value)
    assert not list(lorakit.adapter_layers(base))


def test_architectures_keep_the_features_the_suite_is_meant_to_cover(bases):
    """The tiny configs must switch on what could break exactness: a test on a config without it proves nothing."""
    assert bases("gemma2").config.final_logit_softcapping and bases("gemma2").config.attn_logit_softcapping
    assert bases("gemma3").config.layer_types == ["sliding_attention", "full_attention"]
    assert bases("gemma3").config.sliding_window < INPUTS.shape[1]
    for gemma in ("gemma2", "gemma3"):  # embeddings scaled by sqrt(hidden) inside the model, not in the weight
        model = bases(gemma).model
        assert model.embed_tokens(INPUTS).abs().mean() > model.embed_tokens.weight[INPUTS].abs().mean() * 2
    qkv = bases("phi3").model.layers[0].self_attn.qkv_proj
    assert qkv.out_features == (4 + 2 * 2) * 8  # fused q, k, v of 4 query and 2 key/value heads
    assert bases("phi3").model.layers[0].mlp.gate_up_proj.out_features == 2 * 48
    assert bases("qwen2").model.layers[0].self_attn.q_proj.bias is not None
    config = bases("qwen3").config
    assert config.head_dim * config.num_attention_heads != config.hidden_size
    for moe in ("mixtral", "qwen3-moe"):  # transformers 5 stores experts as 3-D parameters, not nn.Linear
        experts = bases(moe).model.layers[0].mlp.experts
        assert experts.gate_up_proj.ndim == 3 and experts.down_proj.ndim == 3
        assert not any(isinstance(m, torch.nn.Linear) for m in experts.modules())
