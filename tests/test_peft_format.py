"""PEFT interop, checked against the real peft package: export loads in PEFT, PEFT adapters import."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from conftest import (
    UNSUPPORTED,
    VARIANTS,
    fresh_copy,
    make_config,
    model_output,
    perturb_adapters,
    tiny_gpt2,
    tiny_llama,
)

import lorakit
from lorakit import peft_format

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_peft_with_equal_logits(variant, factory, rslora, tmp_path, inputs):
    if (variant, "gpt2" if factory is tiny_gpt2 else "llama") in UNSUPPORTED:
        pytest.skip("the method does not apply to this model")
    base = factory()
    model = lorakit.adapt(fresh_copy(base), make_config(variant, rslora=rslora))
    perturb_adapters(model)
    expected = model_output(model, inputs)
    factors = [layer.export_factors() for _, layer in lorakit.adapter_layers(model)]
    if any(f is None for f in factors):  # not low rank (MoRA with RoPE): refused, pointing to a full merge
        with pytest.raises(lorakit.ConfigError, match="lorakit merge"):
            lorakit.export_peft(model, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
        return
    lorakit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (factory is tiny_gpt2)
    assert config["init_lora_weights"] is True
    ranks = {a.shape[0] for a, _ in factors}
    assert config["r"] == max(ranks) and config["r"] == {"olora": 8}.get(variant, config["r"])
    loaded = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-4, rtol=1e-4)


def test_export_uses_short_target_names_when_exact(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(targets=["q_proj", "v_proj"]))
    lorakit.export_peft(model, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(targets=r"model\.layers\.0\.self_attn\.q_proj"))
    lorakit.export_peft(model, tmp_path / "p2")
    targets = json.loads((tmp_path / "p2" / "adapter_config.json").read_text())["target_modules"]
    assert targets == ["model.layers.0.self_attn.q_proj"]


def _peft_adapter(base, tmp_path, **config):
    model = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "peft")
    return model.eval()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_gives_equal_logits(factory, rslora, tmp_path, inputs):
    base = factory()
    targets = ["q_proj", "v_proj", "down_proj"] if factory is tiny_llama else ["c_attn", "c_fc"]
    theirs = _peft_adapter(
        base,
        tmp_path,
        r=4,
        lora_alpha=12,
        target_modules=targets,
        use_rslora=rslora,
        fan_in_fan_out=factory is tiny_gpt2,
    )
    ours = lorakit.import_peft(fresh_copy(base), tmp_path / "peft")
    torch.testing.assert_close(model_output(ours, inputs), model_output(theirs, inputs), atol=1e-5, rtol=1e-5)
    lorakit.save_adapter(ours, tmp_path / "ours")  # an imported adapter is a normal lorakit adapter
    again = lorakit.load_adapter(fresh_copy(base), tmp_path / "ours")
    torch.testing.assert_close(model_output(again, inputs), model_output(ours, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "config,message",
    [
        (dict(use_dora=True), "DoRA adapters are not supported"),
        (dict(bias="lora_only"), "bias='lora_only'"),
    ],
)
def test_unsupported_peft_features_are_refused(config, message, tmp_path):
    base = tiny_llama()
    _peft_adapter(base, tmp_path, r=4, target_modules=["q_proj", "v_proj"], **config)
    target = fresh_copy(base)
    with pytest.raises(lorakit.AdapterFileError, match=message):
        lorakit.import_peft(target, tmp_path / "peft")
    assert not list(lorakit.adapter_layers(target))


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_import_peft_with_rank_and_alpha_patterns(factory, tmp_path, inputs):
    """Per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern, PEFT's own key matching) come in as
    per-module lorakit ranks, and survive a lorakit save/load and an export back to PEFT."""
    base = factory()
    if factory is tiny_llama:
        targets, rank_pattern, alpha_pattern = ["q_proj", "v_proj"], {"v_proj": 2, r"layers\.0\.self_attn\.q_proj": 6}, {"v_proj": 3}
    else:
        targets, rank_pattern, alpha_pattern = ["c_attn", "c_fc"], {"c_fc": 2}, {"h.1.attn.c_attn": 20}
    theirs = _peft_adapter(
        base, tmp_path, r=4, lora_alpha=8, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        fan_in_fan_out=factory is tiny_gpt2,
    )
    expected_ranks = {
        name.removeprefix("base_model.model."): module.r["default"]
        for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    assert len(set(expected_ranks.values())) > 1
    ours = lorakit.import_peft(fresh_copy(base), tmp_path / "peft")
    assert {name: layer.r for name, layer in lorakit.adapter_layers(ours)} == expected_ranks
    torch.testing.assert_close(model_output(ours, inputs), model_output(theirs, inputs), atol=1e-5, rtol=1e-5)
    lorakit.save_adapter(ours, tmp_path / "ours")  # per-module ranks in lorakit's own format
    meta = json.loads((tmp_path / "ours" / "adapter.json").read_text())
    assert meta["format_version"] == 3 and any("r" in info for info in meta["modules"].values())
    again = lorakit.load_adapter(fresh_copy(base), tmp_path / "ours")
    assert {name: layer.r for name, layer in lorakit.adapter_layers(again)} == expected_ranks
    torch.testing.assert_close(model_output(again, inputs), model_output(ours, inputs), atol=1e-6, rtol=0)
    lorakit.export_peft(again, tmp_path / "back")
    back = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "back").eval()
    torch.testing.assert_close(model_output(back, inputs), model_output(theirs, inputs), atol=1e-5, rtol=1e-5)


def test_invalid_rank_pattern_is_refused(tmp_path):
    base = tiny_llama()
    _peft_adapter(base, tmp_path, r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2})
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["rank_pattern"] = {"q_proj": "two"}
    config_path.write_text(json.dumps(config))
    target = fresh_copy(base)
    with pytest.raises(lorakit.AdapterFileError, match="rank_pattern must map module patterns to positive numbers"):
        lorakit.import_peft(target, tmp_path / "peft")
    assert not list(lorakit.adapter_layers(target))


def test_pickled_peft_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(lorakit.AdapterFileError, match="pickle file lorakit never loads"):
        lorakit.import_peft(tiny_llama(), tmp_path)


def _peft_init_adapter(base, tmp_path, init, **config):
    """A PEFT adapter with `init_lora_weights=init`, its factors moved from their init as training would, saved
    unconverted; returns PEFT's own reload of it onto the original base (which re-runs the init first)."""
    model = peft.get_peft_model(fresh_copy(base), peft.LoraConfig(init_lora_weights=init, **config))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(tmp_path / "peft")
    return peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft").eval()


# Inits that leave the base alone: the saved factors are the whole update, imported as a plain LoRA.
PLAIN_INITS = [True, False, "gaussian", "orthogonal", "eva", "mica"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
@pytest.mark.parametrize("init", [*PLAIN_INITS, "olora", "pissa"], ids=str)
def test_import_peft_matches_peft_for_each_init(init, rslora, tmp_path, inputs):
    """OLoRA and PiSSA rewrite the base at init (W - s·B0·A0) and PeftModel.from_pretrained redoes that on the
    original base: the import must give PEFT's model, not the saved factors on the unchanged base."""
    base = tiny_llama()
    theirs = _peft_init_adapter(
        base, tmp_path, init, r=4, lora_alpha=12, use_rslora=rslora, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    ours = lorakit.import_peft(fresh_copy(base), tmp_path / "peft")
    expected = model_output(theirs, inputs)
    assert (expected - model_output(base, inputs)).abs().max() > 0.05  # the adapter's own effect is visible
    torch.testing.assert_close(model_output(ours, inputs), expected, atol=1e-5, rtol=1e-5)
    method = {"olora": "olora"}.get(init, "lora")
    assert {layer.method for _, layer in lorakit.adapter_layers(ours)} == {method}
    lorakit.save_adapter(ours, tmp_path / "ours")  # and it is a normal lorakit adapter from then on
    again = lorakit.load_adapter(fresh_copy(base), tmp_path / "ours")
    torch.testing.assert_close(model_output(again, inputs), model_output(ours, inputs), atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_import_peft_pissa_on_conv1d(tmp_path, inputs):
    base = tiny_gpt2()
    theirs = _peft_init_adapter(base, tmp_path, "pissa", r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ours = lorakit.import_peft(fresh_copy(base), tmp_path / "peft")
    torch.testing.assert_close(model_output(ours, inputs), model_output(theirs, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_import_peft_0_22_olora_on_conv1d(tmp_path, inputs):
    """PEFT 0.22 factors Conv1D's weight in nn.Linear layout, as lorakit's OLoRA does: the import rebuilds the same
    (A0, B0) from the base and gives PEFT's model."""
    base = tiny_gpt2()
    theirs = _peft_init_adapter(base, tmp_path, "olora", r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    assert peft_format.peft_version(json.loads((tmp_path / "peft" / "adapter_config.json").read_text())) >= (0, 22)
    ours = lorakit.import_peft(fresh_copy(base), tmp_path / "peft")
    assert {layer.method for _, layer in lorakit.adapter_layers(ours)} == {"olora"}
    torch.testing.assert_close(model_output(ours, inputs), model_output(theirs, inputs), atol=1e-5, rtol=1e-5)


def test_peft_version_is_read_as_numbers():
    assert peft_format.peft_version({"peft_version": "0.22.0"}) == (0, 22, 0)
    assert peft_format.peft_version({"peft_version": "0.23.0.dev0"}) == (0, 23, 0)
    assert peft_format.peft_version({"peft_version": "0.9.1"}) < (0, 22) and peft_format.peft_version({}) == (0,)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_import_peft_olora_with_rank_pattern(tmp_path, inputs):
    base = tiny_llama()
    theirs = _peft_init_adapter(
        base, tmp_path, "olora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}
    )
    ours = lorakit.import_peft(fresh_copy(base), tmp_path / "peft")
    assert {layer.r for _, layer in lorakit.adapter_layers(ours)} == {2, 4}
    torch.testing.assert_close(model_output(ours, inputs), model_output(theirs, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "init,message",
    [
        ("pissa_niter_4", "init_lora_weights='pissa_niter_4'.*randomized SVD"),
        ("corda", "init_lora_weights='corda'.*activations"),
        ("lora_ga", "init_lora_weights='lora_ga'.*gradients"),
        ("loftq", "init_lora_weights='loftq'.*quantized"),
        ("olora-gpt2", "init_lora_weights='olora' on Conv1D"),
        ("nonsense", "init_lora_weights='nonsense' is unknown"),
    ],
)
def test_import_peft_refuses_inits_it_cannot_rebuild(init, message, tmp_path):
    """These inits rewrote the base in a way lorakit cannot redo from the base alone: refused in one line that
    names the init and PEFT's conversion to a plain LoRA (loftq: the quantized base)."""
    base = tiny_gpt2() if init == "olora-gpt2" else tiny_llama()
    targets = ["c_proj"] if init == "olora-gpt2" else ["q_proj", "v_proj"]
    _peft_adapter(base, tmp_path, r=4, target_modules=targets, fan_in_fan_out=init == "olora-gpt2")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())  # PEFT would need data, gradients or LoftQ to make these
    config["init_lora_weights"] = init.removesuffix("-gpt2")
    if init == "olora-gpt2":  # PEFT 0.22 factors Conv1D's weight in nn.Linear layout (imported, below); before, not
        config["peft_version"] = "0.21.2"
    if init == "loftq":
        config["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
    config_path.write_text(json.dumps(config))
    target = fresh_copy(base)
    with pytest.raises(lorakit.AdapterFileError, match=message) as caught:
        lorakit.import_peft(target, tmp_path / "peft")
    text = str(caught.value)
    assert "\n" not in text
    if init != "loftq":
        assert "path_initial_model_for_weight_conversion" in text
    assert not list(lorakit.adapter_layers(target))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_peft_pissa_niter_reload_depends_on_the_random_state(tmp_path, inputs):
    """Why pissa_niter_K is refused: PEFT redraws its randomized SVD at every load, so the base it subtracts (and
    the model) depends on the global random state, and no import can be exact."""
    base = tiny_llama()
    _peft_init_adapter(base, tmp_path, "pissa_niter_2", r=4, target_modules=["q_proj", "v_proj"])
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outputs.append(model_output(peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft").eval(), inputs))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


TOKEN_IDS = [3, 5, 60]


def _train_extras(model, inputs, steps=2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    for _ in range(steps):
        model(inputs, labels=inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _token_inputs():
    inputs = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs[:, ::3] = torch.tensor(TOKEN_IDS)
    return inputs


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_of_saved_modules_and_token_rows_loads_in_peft(tied, tmp_path):
    base, inputs = tiny_llama(tie_word_embeddings=tied), _token_inputs()
    config = lorakit.AdapterConfig(
        r=2, targets=["q_proj", "v_proj"], modules_to_save=["norm"], trainable_tokens=TOKEN_IDS
    )
    model = lorakit.adapt(fresh_copy(base), config)
    perturb_adapters(model)
    _train_extras(model, inputs)
    expected = model(inputs).logits
    lorakit.export_peft(model, tmp_path / "peft")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["model.norm"]
    tokens = TOKEN_IDS if tied else {"model.embed_tokens": TOKEN_IDS, "lm_head": TOKEN_IDS}
    assert written["trainable_token_indices"] == tokens
    loaded = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(inputs).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "tied,tokens",
    [(False, TOKEN_IDS), (False, {"embed_tokens": TOKEN_IDS, "lm_head": TOKEN_IDS}), (True, TOKEN_IDS)],
    ids=["untied-embedding-only", "untied-both", "tied"],
)
def test_import_of_peft_saved_modules_and_trainable_tokens(tied, tokens, tmp_path):
    base, inputs = tiny_llama(tie_word_embeddings=tied), _token_inputs()
    peft_config = peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"], trainable_token_indices=tokens
    )
    theirs = peft.get_peft_model(fresh_copy(base), peft_config)
    _train_extras(theirs, inputs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorakit.import_peft(fresh_copy(base), tmp_path / "peft")
    # the modules PEFT wrapped are the modules lorakit trains in full: model.norm alone since PEFT 0.22 (dot boundary)
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}
    assert {name for name, _ in lorakit.saved_modules.saved_modules(ours)} == wrapped
    torch.testing.assert_close(ours(inputs).logits, theirs.eval()(inputs).logits, atol=1e-5, rtol=0)
    lorakit.save_adapter(ours, tmp_path / "ours")
    again = lorakit.load_adapter(fresh_copy(base), tmp_path / "ours")
    assert torch.equal(again(inputs).logits, ours(inputs).logits)


def _peft_file_with_saved_norm(tmp_path):
    """A PEFT save with modules_to_save=["norm"] and q_proj/v_proj LoRA, its tensors, and the tiny base."""
    base = tiny_llama()
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])
    theirs = peft.get_peft_model(fresh_copy(base), config)
    _train_extras(theirs, _token_inputs())
    theirs.save_pretrained(tmp_path / "peft")
    tensors = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    return base, tensors


def test_import_of_a_file_from_peft_before_0_22_takes_every_name_ending_in_the_entry(tmp_path):
    """PEFT before 0.22 saved every module whose name ends with "norm" (the layer norms too); such a file imports
    them all, each with the value in the file."""
    base, tensors = _peft_file_with_saved_norm(tmp_path)
    layer_norm = "base_model.model.model.layers.1.post_attention_layernorm.weight"
    assert layer_norm not in tensors  # this PEFT matches at a dot boundary
    for name, module in base.named_modules():
        if name.endswith("norm") and name != "model.norm":
            tensors[f"base_model.model.{name}.weight"] = module.weight.detach() + 0.5
    safetensors.torch.save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors")
    ours = lorakit.import_peft(fresh_copy(base), tmp_path / "peft")
    saved = {name for name, _ in lorakit.saved_modules.saved_modules(ours)}
    assert "model.norm" in saved and "model.layers.1.post_attention_layernorm" in saved and len(saved) == 5
    weight = ours.get_submodule("model.layers.1.post_attention_layernorm").trained.weight
    assert torch.equal(weight.detach(), tensors[layer_norm])


def test_import_refuses_a_saved_module_the_file_lacks(tmp_path):
    base, tensors = _peft_file_with_saved_norm(tmp_path)
    del tensors["base_model.model.model.norm.weight"]
    safetensors.torch.save_file(tensors, tmp_path / "peft" / "adapter_model.safetensors")
    with pytest.raises(lorakit.errors.AdapterFileError, match="modules_to_save model.norm lacks its tensor 'weight'"):
        lorakit.import_peft(fresh_copy(base), tmp_path / "peft")
