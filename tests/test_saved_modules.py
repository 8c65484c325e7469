"""modules_to_save: a trainable copy beside the frozen original (lorakit.saved_modules)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import fresh_copy, perturb_adapters, tiny_llama

import lorakit
from lorakit.errors import BaseModelMismatchError, ConfigError
from lorakit.saved_modules import SavedModule


def _train(model, inputs, steps=3):
    params = lorakit.inject.trainable_parameters(model)
    optimizer = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _adapted(base, **overrides):
    config = lorakit.AdapterConfig(r=2, targets=["q_proj", "v_proj"], modules_to_save=["lm_head", "norm"], **overrides)
    return lorakit.adapt(fresh_copy(base), config)


def test_names_match_at_a_dot_boundary():
    model = _adapted(tiny_llama())
    saved = [name for name, _ in lorakit.saved_modules.saved_modules(model)]
    assert saved == ["model.norm", "lm_head"]  # not layers.*.input_layernorm, which PEFT's "norm" would also take


def test_training_changes_only_the_copy(inputs):
    base = tiny_llama()
    model = _adapted(base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    _train(model, inputs)
    head = model.lm_head
    assert isinstance(head, SavedModule)
    assert torch.equal(head.original.weight, before["lm_head.weight"])
    assert not torch.equal(head.trained.weight, before["lm_head.weight"])
    assert not torch.equal(model.model.norm.trained.weight, before["model.norm.weight"])
    trained = {id(p) for p in lorakit.inject.trainable_parameters(model)}
    assert all(id(p) in trained for p in model.parameters() if p.requires_grad)
    assert {id(head.trained.weight), id(model.model.norm.trained.weight)} <= trained


def test_disabled_and_unload_restore_the_original_bit_for_bit(inputs):
    base = tiny_llama()
    expected = base(inputs).logits
    model = _adapted(base)
    _train(model, inputs)
    adapted_logits = model(inputs).logits
    assert not torch.equal(adapted_logits, expected)
    with lorakit.disabled(model):
        assert torch.equal(model(inputs).logits, expected)
    assert torch.equal(model(inputs).logits, adapted_logits)
    plain = lorakit.unload(model)
    assert type(plain.lm_head) is torch.nn.Linear and type(plain.model.norm).__name__ == "LlamaRMSNorm"
    assert plain.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in base.state_dict().items())


def test_merge_leaves_the_copies_and_merge_and_unload_keeps_them(inputs):
    base = tiny_llama()
    model = _adapted(base)
    perturb_adapters(model)
    _train(model, inputs, steps=1)
    expected = model(inputs).logits
    lorakit.merge(model)
    assert isinstance(model.lm_head, SavedModule)
    torch.testing.assert_close(model(inputs).logits, expected, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    plain = lorakit.merge_and_unload(model)
    assert type(plain.lm_head) is torch.nn.Linear
    torch.testing.assert_close(plain(inputs).logits, expected, atol=1e-5, rtol=0)


def test_save_load_round_trip_is_exact(tmp_path, inputs):
    base = tiny_llama()
    model = _adapted(base)
    _train(model, inputs)
    expected = model(inputs).logits
    lorakit.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["format_version"] == 4 and set(meta["modules_to_save"]) == {"model.norm", "lm_head"}
    assert meta["config"]["modules_to_save"] == ["lm_head", "norm"]
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")
    assert torch.equal(loaded(inputs).logits, expected)
    assert torch.equal(loaded.lm_head.trained.weight, model.lm_head.trained.weight)
    with lorakit.disabled(loaded):
        assert torch.equal(loaded(inputs).logits, base(inputs).logits)
    # trained again and saved again: the file keeps the fingerprints of the original
    lorakit.save_adapter(loaded, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter.json").read_text())
    assert again["modules_to_save"] == meta["modules_to_save"]


def test_a_plain_adapter_file_is_unchanged(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=2))
    lorakit.save_adapter(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["format_version"] == 3 and "modules_to_save" not in meta and "modules_to_save" not in meta["config"]


def test_a_different_original_is_refused_or_warned(tmp_path, inputs):
    base = tiny_llama()
    model = _adapted(base)
    _train(model, inputs)
    lorakit.save_adapter(model, tmp_path / "adapter")
    other = fresh_copy(base)
    with torch.no_grad():  # only the saved module's original differs: the adapted layers' check passes
        other.lm_head.weight.add_(0.1 * torch.randn_like(other.lm_head.weight))
    with pytest.raises(BaseModelMismatchError, match=r"base module lm_head has different weights .*modules_to_save"):
        lorakit.load_adapter(fresh_copy(other), tmp_path / "adapter")
    with pytest.warns(UserWarning, match="lm_head has different weights .* applying it anyway"):
        loaded = lorakit.load_adapter(fresh_copy(other), tmp_path / "adapter", strict=False)
    assert torch.equal(loaded(inputs).logits, model(inputs).logits)  # the copy does not depend on the original
    # the same weights in another dtype are the same base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the adapted layers' own dtype warning
        lorakit.load_adapter(fresh_copy(base).to(torch.float64), tmp_path / "adapter")


def test_targets_and_saved_modules_do_not_overlap():
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=2, modules_to_save=["layers.0.mlp"]))
    adapted = [name for name, _ in lorakit.adapter_layers(model)]
    assert adapted and not any(name.startswith("model.layers.0.mlp.") for name in adapted)  # all-linear skips them
    assert isinstance(model.model.layers[0].mlp, SavedModule)
    with pytest.raises(ConfigError, match=r"target 'model.layers.0.mlp.up_proj' lies in modules_to_save"):
        lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=2, targets=["up_proj"], modules_to_save=["mlp"]))


def test_bad_modules_to_save_are_refused():
    with pytest.raises(ConfigError, match=r"modules_to_save 'classifier' matches no module"):
        lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=2, modules_to_save=["classifier"]))
    for bad in ([], "lm_head", [""], [3]):
        with pytest.raises(ConfigError, match="modules_to_save=.* is invalid"):
            lorakit.AdapterConfig(modules_to_save=bad)


def test_trainer_checkpoints_keep_the_trained_copies(tmp_path, inputs):
    from lorakit.integrations import load_adapter_into
    from lorakit.integrations.hf import restore, save_for_trainer

    base = tiny_llama()
    model = _adapted(base)
    _train(model, inputs)
    expected = model(inputs).logits
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert torch.equal(load_adapter_into(_adapted(base), tmp_path / "adapter")(inputs).logits, expected)
    # the Trainer's resume file (what model.save_pretrained writes beside the adapter) holds them too
    from safetensors.torch import load_file

    from lorakit.integrations.hf import HEADER_KEY, RESUME_FILE, _parse_header

    save_for_trainer(model, tmp_path / "checkpoint")
    tensors = load_file(tmp_path / "checkpoint" / RESUME_FILE)
    header = _parse_header(tensors.pop(HEADER_KEY))
    resumed = _adapted(base)
    restore(resumed, header, tensors)
    assert torch.equal(resumed(inputs).logits, expected)


@pytest.mark.parametrize("procedure", ["cola:links=2", "increlora"])
def test_procedures_that_save_their_own_layers_keep_the_saved_modules(
    procedure, tiny_model_dir, instruction_file, tmp_path
):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "training"))
    from test_train import config

    from lorakit.training import train

    out = tmp_path / "run"
    train(config(tiny_model_dir, instruction_file, out, procedure=procedure, modules_to_save="norm", steps=4))
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert list(meta["modules_to_save"]) == ["model.norm"]
    from transformers import AutoModelForCausalLM

    loaded = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    assert not torch.equal(loaded.model.norm.trained.weight, loaded.model.norm.original.weight)  # trained
