"""Several named adapters on one base (lorakit.adapted, lorakit.inject): add, list, activate, train, save, load,
delete, merge, unload; and files written before named adapters existed."""

import warnings
from pathlib import Path

import pytest
import torch
from conftest import UNSUPPORTED, VARIANTS, make_config, perturb_adapters, tiny_llama
from safetensors.torch import load_file

import lorakit

LLAMA_VARIANTS = [v for v in VARIANTS if (v, "llama") not in UNSUPPORTED]
FIXTURES = Path(__file__).parent / "fixtures" / "adapters-0.1.0"
IDS = torch.arange(12).reshape(2, 6)


def two_adapters(variant="lora", second="lora", seeds=(1, 2)):
    model = lorakit.adapt(tiny_llama(), make_config(variant, seed=seeds[0]))
    perturb_adapters(model, seed=11)
    lorakit.adapt(model, make_config(second, seed=seeds[1]), name="b")
    perturb_adapters(model, seed=12, adapter="b")
    return model.eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("variant", LLAMA_VARIANTS)
def test_each_adapter_alone_equals_that_adapter_on_its_own_model(variant, tmp_path):
    """Adapter b beside a: selecting it gives exactly what b alone on a fresh base gives (saved and reloaded)."""
    model = two_adapters(variant, variant)
    lorakit.save_adapter(model, tmp_path / "b", name="b")
    lorakit.set_active(model, "b")
    alone = lorakit.load_adapter(tiny_llama(), tmp_path / "b").eval()
    torch.testing.assert_close(logits(model), logits(alone), rtol=0, atol=1e-6)
    lorakit.set_active(model, None)
    torch.testing.assert_close(logits(model), logits(tiny_llama()), rtol=0, atol=0)


def test_first_adapter_is_active_and_a_second_is_idle_until_selected():
    model = lorakit.adapt(tiny_llama(), make_config("lora"))
    perturb_adapters(model)
    before = logits(model)
    lorakit.adapt(model, make_config("lora", seed=5), name="b")
    perturb_adapters(model, seed=3, adapter="b")
    assert [(a.name, a.active) for a in lorakit.adapters(model)] == [("default", True), ("b", False)]
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_adapters_lists_name_method_rank_and_parameter_count():
    model = lorakit.adapt(tiny_llama(), make_config("lora", r=4))
    lorakit.adapt(model, make_config("lorta", r=2), name="t")
    infos = {a.name: a for a in lorakit.adapters(model)}
    assert (infos["default"].method, infos["default"].r) == ("lora", 4)
    lora_params = sum(layer.A.numel() + layer.B.numel() for _, layer in lorakit.adapter_layers(model, "default"))
    assert infos["default"].parameters == lora_params
    shared = lorakit.inject.shared_parameters(model, "t")  # LoRTA's shared tensors belong to its adapter
    assert infos["t"].parameters == sum(p.numel() for p in shared.trainable_parameters().values())
    assert (infos["t"].method, infos["t"].r, infos["t"].active) == ("lorta", 2, False)


def test_two_lorta_adapters_own_their_shared_tensors():
    model = lorakit.adapt(tiny_llama(), make_config("lorta", seed=1))
    lorakit.adapt(model, make_config("lorta", seed=2), name="b")
    first, second = (lorakit.inject.shared_parameters(model, n) for n in ("default", "b"))
    assert first is not second
    assert {id(p) for p in first.parameters()}.isdisjoint(id(p) for p in second.parameters())


def test_set_active_list_adds_the_updates():
    model = two_adapters()
    base = logits(model.eval())
    with lorakit.disabled(model):
        torch.testing.assert_close(logits(model), logits(tiny_llama()), rtol=0, atol=0)
    lorakit.set_active(model, ["default", "b"])
    layer_a = dict(lorakit.adapter_layers(model, "default"))["model.layers.0.self_attn.q_proj"]
    layer_b = dict(lorakit.adapter_layers(model, "b"))["model.layers.0.self_attn.q_proj"]
    host = layer_a.host
    x = torch.randn(2, 3, layer_a.in_features)
    expected = host.base_layer(x) + x @ (layer_a.delta_linear() + layer_b.delta_linear()).T
    torch.testing.assert_close(host(x), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(logits(model), base)


def test_only_active_adapters_train_and_train_selects_among_them():
    model = two_adapters()
    model.train()
    lorakit.set_active(model, ["default", "b"], train="b")
    a_params = [p for _, layer in lorakit.adapter_layers(model, "default") for p in layer.parameters()]
    b_params = [p for _, layer in lorakit.adapter_layers(model, "b") for p in layer.trainable_parameters().values()]
    assert not any(p.requires_grad for p in a_params)
    assert all(p.requires_grad for p in b_params)
    assert {id(p) for p in lorakit.inject.trainable_parameters(model)} == {id(p) for p in b_params}
    model(IDS).logits.sum().backward()
    assert all(p.grad is None for p in a_params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b_params)
    lorakit.set_active(model, "default")
    assert all(not p.requires_grad for p in b_params)
    with pytest.raises(lorakit.ConfigError, match="not among the active adapters"):
        lorakit.set_active(model, "default", train="b")


def test_unnamed_calls_need_a_single_choice():
    model = two_adapters()
    lorakit.set_active(model, ["default", "b"])
    with pytest.raises(lorakit.ConfigError, match="name the adapter"):
        lorakit.save_adapter(model, "unused")
    lorakit.set_active(model, ["default", "b"], train="b")
    assert {n for n, _ in lorakit.adapter_layers(model)} == {n for n, _ in lorakit.adapter_layers(model, "b")}


@pytest.mark.parametrize(
    ("name", "match"),
    [("default", "already has an adapter named 'default'"), ("a.b", "is invalid"), ("base", "is invalid"),
     ("__base__", "is invalid")],
)
def test_bad_or_taken_names_are_refused_before_anything_changes(name, match):
    model = lorakit.adapt(tiny_llama(), make_config("lora"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.ConfigError, match=match):
        lorakit.adapt(model, make_config("lora"), name=name)
    assert [a.name for a in lorakit.adapters(model)] == ["default"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unnamed_second_adapt_is_refused_with_the_fix():
    model = lorakit.adapt(tiny_llama(), make_config("lora"))
    with pytest.raises(lorakit.ConfigError, match=r"already adapted.*pass name="):
        lorakit.adapt(model, make_config("lora"))


def test_load_adapter_by_name_onto_an_adapted_model(tmp_path):
    source = lorakit.adapt(tiny_llama(), make_config("olora", seed=4))
    perturb_adapters(source)
    lorakit.save_adapter(source, tmp_path / "o")
    model = lorakit.adapt(tiny_llama(), make_config("lora"))
    with pytest.raises(lorakit.ConfigError, match="name this one"):
        lorakit.load_adapter(model, tmp_path / "o")
    lorakit.load_adapter(model, tmp_path / "o", name="o")
    lorakit.set_active(model, "o")
    torch.testing.assert_close(logits(model.eval()), logits(source.eval()), rtol=0, atol=1e-6)


def test_base_check_applies_to_each_adapter(tmp_path):
    other = lorakit.adapt(tiny_llama(seed=7), make_config("lora"))
    lorakit.save_adapter(other, tmp_path / "other")
    model = lorakit.adapt(tiny_llama(), make_config("lora"))
    with pytest.raises(lorakit.BaseModelMismatchError):
        lorakit.load_adapter(model, tmp_path / "other", name="x")
    assert [a.name for a in lorakit.adapters(model)] == ["default"]


def test_delete_adapter_removes_its_modules_and_shared_tensors():
    model = lorakit.adapt(tiny_llama(), make_config("lora", targets=["q_proj"]))
    lorakit.adapt(model, make_config("lorta"), name="t")
    lorakit.set_active(model, ["default", "t"])
    lorakit.delete_adapter(model, "t")
    assert [a.name for a in lorakit.adapters(model)] == ["default"]
    assert lorakit.inject.active_adapters(model) == ["default"]
    assert not hasattr(model, "lorakit_shared_t")
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear  # only t adapted it: plain again
    with pytest.raises(lorakit.ConfigError, match="only adapter"):
        lorakit.delete_adapter(model, "default")


def test_merge_one_named_adapter_and_unload_removes_all():
    model = two_adapters()
    lorakit.set_active(model, "b")
    expected = logits(model)
    lorakit.merge(model, adapter="b")
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    with pytest.raises(lorakit.ConfigError, match="merged"):
        lorakit.set_active(model, "default")
    lorakit.unmerge(model)
    lorakit.unload(model)
    assert not lorakit.inject.is_adapted(model)
    torch.testing.assert_close(logits(model), logits(tiny_llama()), rtol=0, atol=1e-6)
    assert "generate" not in model.__dict__  # the routed generate goes with the adapters


def test_merge_and_unload_keeps_the_named_adapter_only():
    model = two_adapters()
    lorakit.set_active(model, "b")
    expected = logits(model)
    plain = lorakit.merge_and_unload(model, adapter="b")
    assert not lorakit.inject.is_adapted(plain)
    torch.testing.assert_close(logits(plain), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "lorta"])
def test_files_written_before_named_adapters_load_unchanged(variant, tmp_path):
    """Adapter directories saved by lorakit 0.1.0 before this change (tests/fixtures): same logits, and saving
    them again writes the same tensors under the same keys."""
    directory = FIXTURES / variant
    model = lorakit.load_adapter(tiny_llama(), directory).eval()
    expected = load_file(directory / "expected_logits.safetensors")["logits"]
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-6)
    lorakit.save_adapter(model, tmp_path / "again")
    old, new = load_file(directory / "adapter.safetensors"), load_file(tmp_path / "again" / "adapter.safetensors")
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old)


def test_a_second_adapter_never_warns_about_the_first():
    model = lorakit.adapt(tiny_llama(), make_config("lora"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.adapt(model, make_config("mini-orthonormal"), name="m")
