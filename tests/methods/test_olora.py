"""OLoRA specifics: factors and effective base equal real PEFT's; the thin QR equals the full one; Conv1D; the base
weight is never changed, so disabled() and unload() are exact in every dtype."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_copy, model_output, perturb_adapters, tiny_gpt2, tiny_llama

import lorakit
from lorakit.methods.olora import olora_factors

peft = pytest.importorskip("peft")


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("r", [1, 4, 16])
def test_factors_and_effective_base_equal_peft(r):
    base = tiny_llama()
    ours = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=r, alpha=2 * r))
    theirs = peft.get_peft_model(
        fresh_copy(base),
        peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights="olora"),
    )
    compared = 0
    for name, layer in lorakit.adapter_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert rel_err(layer.A, peft_layer.lora_A["default"].weight) < 1e-5, name
        assert rel_err(layer.B, peft_layer.lora_B["default"].weight) < 1e-5, name
        # PEFT writes W - s·B0·A0 into the base; lorakit keeps W and subtracts s·B0·A0 in the adapter path
        effective = layer.base_layer.weight - layer.scale * layer.B0 @ layer.A0
        assert rel_err(effective, peft_layer.base_layer.weight) < 1e-5, name
        compared += 1
    assert compared == 14


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (64, 64)])
def test_thin_qr_equals_full_qr(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    q, rr = torch.linalg.qr(w)
    a, b = olora_factors(w, 5)
    torch.testing.assert_close(a, rr[:5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, q[:, :5], atol=1e-5, rtol=1e-5)


def test_conv1d_factors_are_taken_in_linear_layout(inputs):
    base = tiny_gpt2()
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=4))
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    original = base.get_submodule("transformer.h.0.attn.c_attn").weight.T  # out x in
    q, rr = torch.linalg.qr(original)
    torch.testing.assert_close(layer.B0, q[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.A0, rr[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model_output(model, inputs), model_output(base, inputs), atol=1e-5, rtol=1e-5)


def test_olora_on_gpt2_conv1d_leaves_the_output_unchanged_as_peft_0_22_does(inputs):
    """README (Features): OLoRA on Conv1D factors the weight in nn.Linear layout, so A is r x in and the output is
    unchanged at init, on the non-square c_attn (32 -> 96) and the square c_proj. PEFT 0.21 factored the stored
    in x out weight as is (A came out r x out: c_attn failed on the first forward); PEFT 0.22 does it right, and
    this test holds both libraries to it."""
    base = tiny_gpt2()
    before = model_output(base, inputs)
    for target, in_features, out_features in (("attn.c_attn", 32, 96), ("attn.c_proj", 32, 32)):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target], init_lora_weights="olora")
        theirs = peft.get_peft_model(fresh_copy(base), config)
        layer = theirs.base_model.model.get_submodule(f"transformer.h.0.{target}")
        assert layer.lora_A["default"].weight.shape == (4, in_features)
        assert layer.lora_B["default"].weight.shape == (out_features, 4)
        torch.testing.assert_close(model_output(theirs, inputs), before, atol=1e-5, rtol=1e-5)
        ours = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=4, targets=[target]))
        layer = ours.get_submodule(f"transformer.h.0.{target}")
        assert layer.A0.shape == (4, in_features) and layer.B0.shape == (out_features, 4)
        torch.testing.assert_close(model_output(ours, inputs), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_base_is_never_mutated_so_disabled_and_unload_are_exact(dtype, inputs):
    base = tiny_llama().to(dtype)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    expected = model_output(base, inputs)
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=4))
    perturb_adapters(model)
    assert not torch.equal(model_output(model, inputs), expected)
    with lorakit.disabled(model):
        assert torch.equal(model_output(model, inputs), expected)
    lorakit.unload(model)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model_output(model, inputs), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_unchanged_at_init_in_half_precision(dtype, inputs):
    base = tiny_llama().to(dtype)
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=4))
    torch.testing.assert_close(model_output(model, inputs), model_output(base, inputs), atol=1e-5, rtol=0)


def test_dropout_applies_to_the_trained_path_only(inputs):
    """With dropout, W x − s·B0·A0·x + s·B·A·dropout(x): the frozen part sees x, like PEFT's mutated base."""
    base = tiny_llama()
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=4, dropout=0.5)).train()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(3, 32)
    torch.manual_seed(0)
    got = layer(x)
    torch.manual_seed(0)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    want = x @ (layer.base_layer.weight - layer.scale * layer.B0 @ layer.A0).T + layer.scale * dropped @ layer.A.T @ layer.B.T
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_writing_the_residual_into_a_bf16_base_would_change_the_output_at_init(inputs):
    """README (OLoRA): PEFT's way, base ← W − s·B0·A0 rounded to the base dtype plus s·B·A with B·A = B0·A0 at init,
    is not the original layer in bf16: the rounding alone moves the output. lorakit keeps W and (A0, B0) instead,
    and its output at init is the base's."""
    base = tiny_llama().to(torch.bfloat16)
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=4))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    weight, scale = layer.base_layer.weight, layer.scale
    start = scale * layer.B0.float() @ layer.A0.float()
    residual = (weight.float() - start).to(torch.bfloat16)  # what PEFT writes into the base
    peft_weight = residual.float() + start  # the layer PEFT computes at init (in float32 here, to see the rounding)
    assert (peft_weight != weight.float()).float().mean() > 0.5  # most weights moved by the rounding
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(0))
    assert (x @ peft_weight.T - x @ weight.float().T).abs().max() > 1e-4
    x = x.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))  # lorakit: the base's output, bit for bit


def _olora_and_lora_files(tmp_path, base):
    files = {}
    for method in ("olora", "lora"):
        model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method=method, r=4, alpha=8))
        perturb_adapters(model)
        files[method] = (lorakit.save_adapter(model, tmp_path / method), model)
    return files


def test_file_stores_a_and_b_only_and_has_loras_size(tmp_path, inputs):
    """A0, B0 follow from the base (thin QR of W[:, :r]), so the file holds LoRA's tensors and LoRA's size; a load
    recomputes them, giving the trained model bit for bit."""
    import json

    base = tiny_llama()
    files = _olora_and_lora_files(tmp_path, base)
    path, trained = files["olora"]
    meta = json.loads((path / "adapter.json").read_text())
    assert {key for info in meta["modules"].values() for key in info["tensors"]} == {"A", "B"}
    sizes = {method: (p / "adapter.safetensors").stat().st_size for method, (p, _) in files.items()}
    assert sizes["olora"] == sizes["lora"], sizes
    loaded = lorakit.load_adapter(fresh_copy(base), path)
    assert torch.equal(model_output(loaded, inputs), model_output(trained, inputs))
    ours, theirs = dict(lorakit.adapter_layers(loaded)), dict(lorakit.adapter_layers(trained))
    assert all(torch.equal(ours[n].A0, theirs[n].A0) and torch.equal(ours[n].B0, theirs[n].B0) for n in ours)


def _write_old_layout(path, model):
    """Rewrite a saved OLoRA adapter as lorakit wrote it before A0, B0 were recomputed: A, B, A0, B0 per module in
    the tensor file (and adapter.json), no update sketch."""
    import hashlib
    import json

    from safetensors.torch import load_file, save

    tensors = load_file(str(path / "adapter.safetensors"))
    meta = json.loads((path / "adapter.json").read_text())
    layers = dict(lorakit.adapter_layers(model))
    for name, info in meta["modules"].items():
        info.pop("update_sketch")
        for key in ("A0", "B0"):
            tensors[f"{name}.{key}"] = getattr(layers[name], key).detach().clone()
            info["tensors"][key] = list(tensors[f"{name}.{key}"].shape)
    blob = save(tensors, metadata={"format": "lorakit-adapter"})
    (path / "adapter.safetensors").write_bytes(blob)
    meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    (path / "adapter.json").write_text(json.dumps(meta))
    return tensors


def test_files_of_the_old_layout_still_load(tmp_path, inputs):
    base = tiny_llama()
    path, trained = _olora_and_lora_files(tmp_path, base)["olora"]
    _write_old_layout(path, trained)
    expected = model_output(trained, inputs)
    loaded = lorakit.load_adapter(fresh_copy(base), path)
    assert torch.equal(model_output(loaded, inputs), expected)
    resumed = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="olora", r=4, alpha=8))
    lorakit.integrations.hf.load_adapter_into(resumed, path)  # the Trainer integration reads it too
    assert torch.equal(model_output(resumed, inputs), expected)
    lorakit.save_adapter(loaded, tmp_path / "again")  # written again in the new layout, A and B only
    assert torch.equal(model_output(lorakit.load_adapter(fresh_copy(base), tmp_path / "again"), inputs), expected)


def test_an_old_files_a0_b0_are_used_as_saved(tmp_path, inputs):
    """An old file's A0, B0 are what it was trained with (on other hardware they may differ in the last bits from
    this machine's QR): they are used, not recomputed."""
    base = tiny_llama()
    path, trained = _olora_and_lora_files(tmp_path, base)["olora"]
    name = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        dict(lorakit.adapter_layers(trained))[name].A0.mul_(1.001)
    tensors = _write_old_layout(path, trained)
    loaded = lorakit.load_adapter(fresh_copy(base), path)
    assert torch.equal(dict(lorakit.adapter_layers(loaded))[name].A0, tensors[f"{name}.A0"])
    assert torch.equal(model_output(loaded, inputs), model_output(trained, inputs))
