"""The base-model check: the same base in another dtype or restored after merge/unmerge is accepted; another base
(another init, or one module with 1% relative noise) is refused in every dtype pair. See `lorakit.fingerprint`."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import VARIANTS, fresh_copy, make_config, model_output, perturb_adapters, tiny_llama

import lorakit
from lorakit.fingerprint import DIFFERENT, SAME, SAME_OTHER_DTYPE, Fingerprint, tolerance

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKED_VARIANTS = ["lora", "olora", "mini-orthonormal", "mini-qr", "loraxs"]  # loraxs: SVD recomputed on load


def saved_adapter(tmp_path, variant="lora", dtype=torch.float32, base=None):
    base = tiny_llama() if base is None else base
    model = lorakit.adapt(fresh_copy(base).to(dtype), make_config(variant))
    perturb_adapters(model)
    return lorakit.save_adapter(model, tmp_path / f"{variant}-{dtype}"), model


def load_quietly(base, path, **kwargs):
    """Load and return (model, warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lorakit.load_adapter(base, path, **kwargs)
    return model, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def noisy(model, module="model.layers.1.mlp.up_proj", relative=0.01, seed=7):
    """The same weights with one module changed by `relative` relative noise (w · (1 + relative·N(0, 1)))."""
    model = fresh_copy(model)
    weight = model.get_submodule(module).weight
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.mul_(1 + relative * torch.randn(weight.shape, generator=gen).to(weight.dtype))
    return model


HALF_PRECISION_CASES = [(v, s) for v in CHECKED_VARIANTS for s in ("bf16", "fp16")]


@pytest.mark.parametrize(("variant", "served"), HALF_PRECISION_CASES)
def test_fp32_adapter_loads_on_the_same_base_in_half_precision(variant, served, tmp_path, inputs):
    path, trained = saved_adapter(tmp_path, variant)
    expected = model_output(trained, inputs)
    model, messages = load_quietly(tiny_llama().to(DTYPES[served]), path)
    assert len(messages) == 1 and "trained on a float32 base" in messages[0], messages
    assert str(DTYPES[served]).removeprefix("torch.") in messages[0]
    torch.testing.assert_close(model_output(model, inputs).float(), expected, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("variant", CHECKED_VARIANTS)
def test_adapter_saved_after_casting_to_bf16_loads_on_the_fp32_base(variant, tmp_path):
    model = lorakit.adapt(tiny_llama(), make_config(variant))
    perturb_adapters(model)
    model.to(torch.bfloat16)
    path = lorakit.save_adapter(model, tmp_path / "a")
    _, messages = load_quietly(tiny_llama(), path)
    assert messages == []  # the fingerprint was taken at adapt(), on the fp32 weights


@pytest.mark.parametrize("variant", CHECKED_VARIANTS)
def test_adapter_trained_in_bf16_loads_on_the_fp32_base_with_a_warning(variant, tmp_path):
    path, _ = saved_adapter(tmp_path, variant, dtype=torch.bfloat16)
    _, messages = load_quietly(tiny_llama(), path)
    assert len(messages) == 1 and "trained on a bfloat16 base and this base is float32" in messages[0]


@pytest.mark.parametrize("variant", CHECKED_VARIANTS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_restored_base_is_accepted(variant, dtype, tmp_path, inputs):
    """merge + unmerge changes the last bits of the weights; unload() then returns that restored base."""
    model = lorakit.adapt(tiny_llama().to(DTYPES[dtype]), make_config(variant))
    perturb_adapters(model, scale=0.01)
    lorakit.merge(model)
    lorakit.unmerge(model)
    path = lorakit.save_adapter(model, tmp_path / "a")
    expected = model_output(model, inputs)
    restored = lorakit.unload(fresh_copy(model))
    for base in (restored, tiny_llama().to(DTYPES[dtype])):
        loaded, messages = load_quietly(base, path)
        assert messages == []
        torch.testing.assert_close(model_output(loaded, inputs), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_unload_without_merge_is_bit_exact(variant):
    for dtype in DTYPES.values():
        base = tiny_llama().to(dtype)
        model = lorakit.adapt(fresh_copy(base), make_config(variant))
        perturb_adapters(model)
        plain = lorakit.unload(model)
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in base.state_dict().items())


PAIRS = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16"), ("bf16", "fp32"), ("fp32", "fp16")]


@pytest.mark.parametrize("saved,served", PAIRS)
@pytest.mark.parametrize("other", ["another init", "1% noise on one module"])
def test_a_different_base_is_refused_in_every_dtype_pair(saved, served, other, tmp_path):
    path, _ = saved_adapter(tmp_path, "lora", dtype=DTYPES[saved])
    wrong = tiny_llama(seed=5) if other == "another init" else noisy(tiny_llama())
    target = wrong.to(DTYPES[served])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(lorakit.BaseModelMismatchError, match="different weights"):
        lorakit.load_adapter(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_one_percent_noise_names_the_module(tmp_path):
    path, _ = saved_adapter(tmp_path, "lora")
    with pytest.raises(lorakit.BaseModelMismatchError, match=r"model.layers.1.mlp.up_proj .*\(1 of 14 modules"):
        lorakit.load_adapter(noisy(tiny_llama()), path)


def test_not_strict_warns_for_a_different_base_also_for_mini_qr(tmp_path):
    path, _ = saved_adapter(tmp_path, "mini-qr")
    model, messages = load_quietly(tiny_llama(seed=5), path, strict=False)
    assert len(list(lorakit.adapter_layers(model))) == 14
    assert any("different weights" in m and "recomputed from THIS base" in m for m in messages), messages


def test_fingerprint_is_taken_before_anything_changes_the_weight():
    base = tiny_llama()
    originals = {n: Fingerprint.of(m.weight) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = lorakit.adapt(fresh_copy(base), make_config("lora"))
    perturb_adapters(model)
    lorakit.merge(model)  # changes every base weight before the first save
    for name, layer in lorakit.adapter_layers(model):
        assert layer.base_fingerprint.digest == originals[name].digest


def test_fingerprint_verdicts_and_tolerances():
    weight = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    saved = Fingerprint.of(weight)
    assert saved.compare(Fingerprint.of(weight.clone())) == (SAME, 0.0)
    verdict, diff = saved.compare(Fingerprint.of(weight.to(torch.bfloat16)))
    assert verdict == SAME_OTHER_DTYPE and 5e-4 < diff < tolerance("float32", "bfloat16") == 2**-24 + 2**-8
    assert 1e-3 < diff < 2.5e-3  # README: one rounding to bf16 moves the samples by about 0.16% RMS
    noise = 1 + 0.01 * torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    verdict, diff = saved.compare(Fingerprint.of(weight * noise))
    assert verdict == DIFFERENT and 0.005 < diff < 0.015  # 1% relative noise: about 1%
    verdict, diff = saved.compare(Fingerprint.of(torch.randn(64, 48, generator=torch.Generator().manual_seed(2))))
    assert verdict == DIFFERENT and 1.1 < diff < 1.7  # another random init: about √2, 140%
    assert saved.compare(Fingerprint.of(weight[:32]))[0] == DIFFERENT
    assert tolerance("float32", "float32") == 1e-4 and tolerance("bfloat16", "bfloat16") == 2**-7
    assert Fingerprint.from_json(saved.to_json()).compare(saved) == (SAME, 0.0)


def test_version_1_files_compare_the_exact_digest(tmp_path):
    import json

    path, _ = saved_adapter(tmp_path, "lora")
    data = json.loads((path / "adapter.json").read_text())
    data["format_version"] = 1
    for info in data["modules"].values():
        info["base_fingerprint"] = info["base_fingerprint"]["digest"]
    (path / "adapter.json").write_text(json.dumps(data))
    lorakit.load_adapter(tiny_llama(), path)
    with pytest.raises(lorakit.BaseModelMismatchError):
        lorakit.load_adapter(noisy(tiny_llama()), path)


def _exact_update_change(trained, loaded) -> dict[str, float]:
    """{module: ‖X' − X‖ / ‖X‖} of the part X = B·A of the update that the rebuilt factors give (LoRA-XS, LoRA-Mini
    qr: ΔW; OLoRA: B0·A0), between the trained layers and those rebuilt on load (dense, float64)."""
    rebuilt = dict(lorakit.adapter_layers(loaded))
    changes = {}
    for name, layer in lorakit.adapter_layers(trained):
        (a, b), (a2, b2) = layer.recomputed_factors(), rebuilt[name].recomputed_factors()
        before, after = b.double() @ a.double(), b2.double() @ a2.double()
        changes[name] = float((after - before).norm() / before.norm())
    return changes


def _stated_percent(message: str) -> float:
    import re

    return float(re.search(r"about (\d+(?:\.\d+)?)%", message).group(1)) / 100


def _without_sign_anchors(path):
    """A LoRA-XS file as earlier versions wrote it: no sign anchors, so the canonical sign rule applies on load."""
    import json

    meta = json.loads((path / "adapter.json").read_text())
    for info in meta["modules"].values():
        del info["fields"]
    (path / "adapter.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("saved", "served"), [("fp32", "bf16"), ("bf16", "fp32")])
def test_loraxs_whose_update_changes_in_another_dtype_is_refused(saved, served, tmp_path, inputs):
    """Without sign anchors, fp32 LoRA-XS onto the same base in bf16: one module's rebuilt update moves by 165% (the
    canonical sign of one singular pair flips on the rounded weights; the SVD is float64 already), 129% the other
    way. Refused, the model untouched; with strict=False it loads with a warning that states the measured change."""
    path, trained = saved_adapter(tmp_path, "loraxs", dtype=DTYPES[saved])
    _without_sign_anchors(path)
    target = tiny_llama().to(DTYPES[served])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(lorakit.BaseModelMismatchError, match=r"loraxs rebuilds frozen factors .* by about \d+%") as e:
        lorakit.load_adapter(target, path)
    dtype_name = str(DTYPES[saved]).removeprefix("torch.")
    assert "\n" not in str(e.value) and "strict=False" in str(e.value) and f"{dtype_name} base" in str(e.value)
    assert not list(lorakit.adapter_layers(target))
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    model, messages = load_quietly(target, path, strict=False)
    exact = _exact_update_change(trained, model)
    worst = max(exact, key=exact.get)
    assert exact[worst] > 1.0 and worst in messages[0] and "applying it anyway" in messages[0]
    assert exact[worst] / 1.5 < _stated_percent(messages[0]) < exact[worst] * 1.5  # a sketch: within a factor 1.3
    assert "change the update by up to about" in messages[1]


REBUILT_CASES = [("mini-qr", "bf16"), ("mini-qr", "fp16"), ("olora", "bf16"), ("olora", "fp16")]
REBUILT_CASES += [("loraxs", "bf16"), ("loraxs", "fp16")]


@pytest.mark.parametrize(("variant", "served"), REBUILT_CASES)
def test_dtype_warning_states_how_much_the_rebuilt_update_changes(variant, served, tmp_path):
    """Below the tolerance the load goes ahead; its one warning says what the rebuilt factors changed, by the
    measured figure (fp32 -> bf16 on this model: LoRA-Mini qr's update 0.30%, OLoRA's s·B0·A0 0.3%, LoRA-XS's
    update 1.8% with its sign anchors)."""
    path, trained = saved_adapter(tmp_path, variant)
    model, messages = load_quietly(tiny_llama().to(DTYPES[served]), path)
    part = "s·B0·A0" if variant == "olora" else "the update"
    assert len(messages) == 1 and f"rebuilt from it change {part} by up to about" in messages[0], messages
    exact = max(_exact_update_change(trained, model).values())
    assert 0 < exact < 0.05
    assert exact / 1.5 < _stated_percent(messages[0]) < exact * 1.5


def test_file_without_update_sketch_loads_unchecked(tmp_path, inputs):
    """Files written before the check (no "update_sketch") load as they did."""
    import json

    path, trained = saved_adapter(tmp_path, "loraxs")
    meta = json.loads((path / "adapter.json").read_text())
    assert all("update_sketch" in info for info in meta["modules"].values())
    for info in meta["modules"].values():
        del info["update_sketch"], info["fields"]
    (path / "adapter.json").write_text(json.dumps(meta))
    model, messages = load_quietly(tiny_llama().to(torch.float16), path)
    assert len(messages) == 1 and "by an amount this file (saved before lorakit checked it) cannot tell" in messages[0]
    model, messages = load_quietly(tiny_llama(), path)
    assert messages == []


def test_invalid_update_sketch_is_refused(tmp_path):
    import json

    path, _ = saved_adapter(tmp_path, "mini-qr")
    meta = json.loads((path / "adapter.json").read_text())
    next(iter(meta["modules"].values()))["update_sketch"] = "AAAA"
    (path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(lorakit.AdapterFileError, match="invalid 'update_sketch'"):
        lorakit.load_adapter(tiny_llama(), path)


def test_invalid_sign_anchors_are_refused(tmp_path):
    import json

    path, _ = saved_adapter(tmp_path, "loraxs")
    meta = json.loads((path / "adapter.json").read_text())
    next(iter(meta["modules"].values()))["fields"]["sign_anchors"] = [0, 1, 10_000, 2]
    (path / "adapter.json").write_text(json.dumps(meta))
    target = tiny_llama()
    with pytest.raises(lorakit.AdapterFileError, match="invalid 'fields' .*sign_anchors must be 4 row indices"):
        lorakit.load_adapter(target, path)
    assert not list(lorakit.adapter_layers(target))
