"""Adapter files: exact round trips, compact LoRA-Mini, fingerprints, corrupt input, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import (
    UNSUPPORTED,
    VARIANTS,
    fresh_copy,
    kill_during_write,
    make_config,
    model_output,
    perturb_adapters,
    tiny_gpt2,
    tiny_llama,
)

import lorakit
from lorakit import atomic

REPO = Path(__file__).resolve().parents[1]


def adapted(variant="lora", factory=tiny_llama, **overrides):
    base = factory()
    model = lorakit.adapt(fresh_copy(base), make_config(variant, **overrides))
    perturb_adapters(model)
    return base, model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_exact(variant, factory, tmp_path, inputs):
    if (variant, "gpt2" if factory is tiny_gpt2 else "llama") in UNSUPPORTED:
        pytest.skip("the method does not apply to this model")
    base, model = adapted(variant, factory)
    expected = model_output(model, inputs)
    lorakit.save_adapter(model, tmp_path / "adapter")
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-6, rtol=0)
    with lorakit.disabled(loaded):
        torch.testing.assert_close(model_output(loaded, inputs), model_output(base, inputs), atol=1e-5, rtol=0)
    assert lorakit.summary(loaded).trainable == lorakit.summary(model).trainable


def test_only_unregenerable_tensors_are_stored(tmp_path):
    from safetensors import safe_open

    stored = {}
    for variant in VARIANTS:
        _, model = adapted(variant)
        lorakit.save_adapter(model, tmp_path / variant)
        with safe_open(tmp_path / variant / "adapter.safetensors", "pt") as handle:
            stored[variant] = {key.rsplit(".", 1)[-1] for key in handle.keys()}
    assert stored["lora"] == {"A", "B"}
    assert stored["olora"] == {"A", "B"}  # A0, B0 are recomputed from the base
    assert stored["mini-orthonormal"] == stored["mini-normal"] == stored["mini-qr"] == {"A_in", "B_in"}
    assert stored["loraxs"] == {"R"}  # U, Σ, V are recomputed from the base
    assert stored["melora"] == {"A", "B"}
    assert stored["mora"] == {"M"}  # the gather indices and RoPE tables are rebuilt
    assert stored["prolora"] == {"A0", "B0", "A_u", "B_u"}
    assert stored["lorta"] == {"A", "B", "C_h", "C_kv", "C_l", "C_m"}  # once, under lorakit_shared


def test_mini_file_is_ten_times_smaller_than_lora_at_width_512(tmp_path):
    base = tiny_llama(
        hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=1
    )
    sizes = {}
    for method in ("lora", "mini"):
        model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method=method, r=16, mini_a=32, mini_b=32))
        lorakit.save_adapter(model, tmp_path / method)
        sizes[method] = (tmp_path / method / "adapter.safetensors").stat().st_size
    assert sizes["lora"] / sizes["mini"] >= 10, sizes


def test_fresh_process_load(tmp_path):
    base, model = adapted("mini-orthonormal")
    lorakit.save_adapter(model, tmp_path / "adapter")
    inputs = torch.arange(12).reshape(2, 6) % 64
    expected = model_output(model, inputs)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO / "tests")!r})
        from conftest import tiny_llama
        import lorakit
        model = lorakit.load_adapter(tiny_llama(), {str(tmp_path / "adapter")!r})
        out = model(torch.arange(12).reshape(2, 6) % 64).logits
        from safetensors.torch import save_file
        save_file({{"out": out.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["out"], expected, atol=1e-6, rtol=0)


def test_wrong_shapes_are_refused_without_mutation(tmp_path):
    _, model = adapted("olora")
    lorakit.save_adapter(model, tmp_path / "a")
    other = tiny_llama(hidden_size=48, intermediate_size=48)
    before = state(other)
    with pytest.raises(
        lorakit.BaseModelMismatchError,
        match=r"model.layers.0.self_attn.q_proj is 48 -> 48 but the adapter expects 32 -> 32",
    ):
        lorakit.load_adapter(other, tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_wrong_weights_are_refused_or_warned(tmp_path, inputs):
    _, model = adapted("lora")
    lorakit.save_adapter(model, tmp_path / "a")
    other = tiny_llama(seed=5)
    with pytest.raises(
        lorakit.BaseModelMismatchError, match="base module model.layers.0.self_attn.q_proj has different weights"
    ):
        lorakit.load_adapter(fresh_copy(other), tmp_path / "a")
    with pytest.warns(UserWarning, match="different weights"):
        loaded = lorakit.load_adapter(fresh_copy(other), tmp_path / "a", strict=False)
    assert len(list(lorakit.adapter_layers(loaded))) == 14


def _saved(tmp_path, variant="lora"):
    base, model = adapted(variant)
    path = lorakit.save_adapter(model, tmp_path / "a")
    return base, path


def _edit_json(path, edit):
    data = json.loads((path / "adapter.json").read_text())
    edit(data)
    (path / "adapter.json").write_text(json.dumps(data))


BROKEN = {
    "missing dir": (lambda p: p.rename(p.with_name("gone")), "not found"),
    "missing json": (lambda p: (p / "adapter.json").unlink(), "adapter.json is missing"),
    "json not json": (lambda p: (p / "adapter.json").write_text("{oops"), "is not valid JSON"),
    "json missing modules": (lambda p: _edit_json(p, lambda d: d.pop("modules")), "field 'modules' is missing"),
    "json bad config": (
        lambda p: _edit_json(p, lambda d: d["config"].update(r=-1)),
        r"invalid config \(r=-1 is invalid",
    ),
    "json huge dims": (
        lambda p: _edit_json(p, lambda d: next(iter(d["modules"].values())).update({"in": 10**12})),
        "field 'in' must be an integer",
    ),
    "newer version": (
        lambda p: _edit_json(p, lambda d: d.update(format_version=99)),
        "format version 99 was written by a newer lorakit",
    ),
    "module rank not an integer": (
        lambda p: _edit_json(p, lambda d: next(iter(d["modules"].values())).update(r="4")),
        "field 'r' must be an integer",
    ),
    "module alpha not positive": (
        lambda p: _edit_json(p, lambda d: next(iter(d["modules"].values())).update(alpha=0)),
        "field 'alpha' must be a positive number",
    ),
    "module rank does not fit its tensors": (
        lambda p: _edit_json(p, lambda d: next(iter(d["modules"].values())).update(r=3)),
        "tensors do not fit the config",
    ),
    "missing tensors": (lambda p: (p / "adapter.safetensors").unlink(), "adapter.safetensors is missing"),
    "truncated tensors": (lambda p: os.truncate(p / "adapter.safetensors", 100), "does not match adapter.json"),
    "corrupt tensors": (lambda p: (p / "adapter.safetensors").write_bytes(b"\x00" * 64), "does not match adapter.json"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapter_files_are_refused_without_mutation(case, tmp_path):
    base, path = _saved(tmp_path)
    breaker, message = BROKEN[case]
    breaker(path)
    target = fresh_copy(base)
    before = state(target)
    with pytest.raises(lorakit.AdapterFileError, match=message):
        lorakit.load_adapter(target, path)
    assert not list(lorakit.adapter_layers(target))
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_crafted_shapes_that_do_not_fit_the_config_are_refused(tmp_path):
    base, path = _saved(tmp_path, "mini-normal")
    _edit_json(path, lambda d: d["config"].update(mini_a=10**6))
    with pytest.raises(lorakit.AdapterFileError, match="tensors do not fit the config"):
        lorakit.load_adapter(fresh_copy(base), path)


def test_disk_full_during_save_keeps_previous_adapter(tmp_path, monkeypatch, inputs):
    base, model = adapted("lora")
    path = lorakit.save_adapter(model, tmp_path / "a")
    expected = model_output(lorakit.load_adapter(fresh_copy(base), path), inputs)
    perturb_adapters(model, seed=9)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(lorakit.LorakitError, match="No space left on device; the previous file there .* is unchanged"):
        lorakit.save_adapter(model, path)
    monkeypatch.undo()
    torch.testing.assert_close(model_output(lorakit.load_adapter(fresh_copy(base), path), inputs), expected)
    assert sorted(p.name for p in path.iterdir()) == ["adapter.json", "adapter.safetensors"]


def test_kill_during_save_keeps_previous_adapter(tmp_path, inputs):
    base, model = adapted("lora")
    path = lorakit.save_adapter(model, tmp_path / "a")
    expected = model_output(lorakit.load_adapter(fresh_copy(base), path), inputs)
    # A second process starts saving a different adapter over it and is killed -9 in the middle of the write.
    kill_during_write(f"""
        from conftest import tiny_llama, perturb_adapters
        import lorakit
        model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(method="lora", r=4, alpha=8))
        perturb_adapters(model, seed=3)
        lorakit.save_adapter(model, {str(path)!r})
    """)
    torch.testing.assert_close(model_output(lorakit.load_adapter(fresh_copy(base), path), inputs), expected)


def test_save_into_a_file_path_is_refused(tmp_path):
    _, model = adapted("lora")
    (tmp_path / "file").write_text("x")
    with pytest.raises(lorakit.LorakitError, match="exists and is a file"):
        lorakit.save_adapter(model, tmp_path / "file")


def test_read_adapter_reports_metadata(tmp_path):
    _, path = _saved(tmp_path, "mini-orthonormal")
    metadata, config, tensors = lorakit.read_adapter(path)
    assert metadata["format_version"] == 3 and config.method == "mini" and metadata["lorakit_version"]
    assert all(len(info["base_fingerprint"]["digest"]) == 64 for info in metadata["modules"].values())
    assert metadata["trainable_parameters"] == sum(t.numel() for t in tensors.values())


def test_per_module_ranks_round_trip(tmp_path, inputs):
    """A model whose modules have different ranks and alphas (XGBLoRA's and IncreLoRA's adapters) is saved with
    per-module "r" / "alpha" (format 3), without padding, and loads back exactly."""
    base = tiny_llama()
    model = fresh_copy(base)
    layers = {}
    for rank, alpha, targets in ((2, 2.0, ["q_proj"]), (5, 10.0, ["v_proj"]), (2, 2.0, ["down_proj"])):
        built = lorakit.inject.build_layers(model, lorakit.AdapterConfig(r=rank, alpha=alpha, targets=targets))
        layers.update(built)
    lorakit.inject.install(model, layers)
    perturb_adapters(model)
    lorakit.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["format_version"] == 3 and meta["config"]["r"] == 2  # the most common rank at the top
    assert {n: (i.get("r"), i.get("alpha")) for n, i in meta["modules"].items() if "r" in i} == {
        n: (5, 10.0) for n in layers if n.endswith("v_proj")
    }
    stored = sum(t.numel() for t in lorakit.read_adapter(tmp_path / "a")[2].values())
    assert stored == sum(p.numel() for p in lorakit.inject.trainable_parameters(model))  # no padding
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "a")
    assert {n: (l.r, l.scale) for n, l in lorakit.adapter_layers(loaded)} == {n: (l.r, l.scale) for n, l in layers.items()}
    assert torch.equal(model_output(loaded, inputs), model_output(model, inputs))
