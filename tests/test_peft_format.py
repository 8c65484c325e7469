"""PEFT interop, checked against the real peft package: export loads in PEFT, PEFT adapters import."""

from __future__ import annotations

import json

import pytest
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
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
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
