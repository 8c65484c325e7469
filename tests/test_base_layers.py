"""Every method on quantized bases (bitsandbytes nf4 / fp4 / int8, torchao NF4), read through `lorakit.base_layers`.

What holds on each: the layer is recognised by what its weight can do; methods that read W read the dequantized
weight; every trained tensor gets a gradient; the quantized weight's bytes never change; the base check, merge and
PEFT agree with what README states.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.base_layers import Bitsandbytes4bit, Bitsandbytes8bit, DenseLinear, TorchaoNF4, _row_scales, frozen_base
from lorakit.methods import METHODS
from lorakit.quantize import dequantize_model, model_quantization, quantize_model
from tests.conftest import METHOD_SETTINGS, VOCAB, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
SCHEMES = ("nf4", "fp4", "int8", "torchao-nf4")
HEAD_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def base_model(seed: int = 0):
    # every weight's element count a multiple of 64 x 256 (torchao's NF4 needs whole blocks of its scalers)
    return tiny_llama(seed, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)


def to_torchao_nf4(model):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    head = model.get_output_embeddings()
    for module in model.modules():
        if type(module) is nn.Linear and module is not head:
            module.weight = nn.Parameter(to_nf4(module.weight.detach()), requires_grad=False)
    return model


def quantized(scheme: str, seed: int = 0):
    model = base_model(seed)
    return to_torchao_nf4(model) if scheme == "torchao-nf4" else quantize_model(model, scheme)


def config(method: str, **overrides):
    settings = dict(method=method, r=4, **METHOD_SETTINGS.get(method, {}))
    if method == "mini":
        settings.update(mini_a=8, mini_b=8)
    settings.update(overrides)
    return lorakit.AdapterConfig(**settings)


def stored_bytes(model) -> dict[str, torch.Tensor]:
    """Every tensor that stores a quantized weight (packed data and statistics), copied."""
    out = {}
    for full_name, module in model.named_modules():
        name = full_name.replace(".base_layer", "")
        frozen = frozen_base(module)
        if frozen is None or frozen.quantization is None:
            continue
        weight = module.weight
        out[name] = weight.data.clone() if not isinstance(frozen, TorchaoNF4) else weight.quantized_data.clone()
        if isinstance(frozen, Bitsandbytes4bit):
            out[name + ".absmax"] = weight.quant_state.absmax.clone()
        if isinstance(frozen, Bitsandbytes8bit):
            out[name + ".SCB"] = _row_scales(module).clone()
    return out


def ids(seed=0):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layers_recognised_by_capability(scheme):
    model = quantized(scheme)
    expected = {"nf4": Bitsandbytes4bit, "fp4": Bitsandbytes4bit, "int8": Bitsandbytes8bit}.get(scheme, TorchaoNF4)
    frozen = frozen_base(model.model.layers[0].mlp.down_proj)
    assert type(frozen) is expected and frozen.quantization == scheme and not frozen.can_merge
    assert (frozen.in_features, frozen.out_features) == (256, 128)
    assert isinstance(frozen_base(model.lm_head), DenseLinear)  # the head stays full precision
    dense = base_model().model.layers[0].mlp.down_proj.weight
    error = ((frozen.dense_weight().float() - dense).norm() / dense.norm()).item()
    assert error < (0.02 if scheme == "int8" else 0.2), error  # the dequantized weight is this layer's weight


def test_multihead_attention_out_proj_is_not_a_target():
    """nn.MultiheadAttention never calls its out_proj's forward: an adapter there would silently do nothing."""
    attention = nn.MultiheadAttention(16, 2)
    assert frozen_base(attention.out_proj) is None


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_the_quantized_weight_never_changes(method, scheme):
    model = quantized(scheme)
    before = stored_bytes(model)
    assert before
    lorakit.adapt(model, config(method))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(3):
        logits = model(input_ids=ids(step)).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids(step)[:, 1:].reshape(-1))
        loss.backward()
        missing = [p.shape for p in params if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, missing
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    after = stored_bytes(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    quantized_params = [p for n, p in model.named_parameters() if "base_layer.weight" in n]
    assert quantized_params and not any(p.requires_grad or p.grad is not None for p in quantized_params)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_read_the_dequantized_weight(method, scheme):
    """An adapter on the quantized base equals the same adapter on a dense copy of its dequantized weights: the
    init of OLoRA (QR), LoRA-XS (SVD), LoRA-Mini qr, and every other method's tensors, and the outputs."""
    model = quantized(scheme)
    dense = dequantize_model(copy.deepcopy(model))
    for m in (model, dense):
        lorakit.adapt(m, config(method, **({"mini_outer": "qr"} if method == "mini" else {})))
    def adapter_state(m):
        layers = {n for n, layer in m.named_modules() if isinstance(layer, lorakit.AdapterLayer)}
        return {k: v for k, v in m.state_dict().items() if k.rsplit(".", 1)[0] in layers or "lorakit_shared" in k}

    quantized_state, dense_state = adapter_state(model), adapter_state(dense)
    assert quantized_state
    assert quantized_state.keys() == dense_state.keys()
    for key in quantized_state:
        assert torch.allclose(quantized_state[key], dense_state[key], rtol=1e-5, atol=1e-6), key
    for layer in (m for m in model.modules() if isinstance(m, lorakit.AdapterLayer)):
        for name, buffer in layer.named_buffers(recurse=False):
            other = dict(lorakit.adapter_layers(dense))[layer.name].get_buffer(name)
            assert torch.allclose(buffer, other, rtol=1e-4, atol=1e-5), (layer.name, name)
    with torch.no_grad():
        diff = (model(input_ids=ids()).logits - dense(input_ids=ids()).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
def test_gradients_equal_those_on_the_dequantized_dense_copy(scheme):
    """Training on the quantized base trains the function of its dequantized weights: the backward through the
    dequantizing GEMM gives the adapter the gradients a dense copy of those weights gives."""
    model = quantized(scheme)
    dense = dequantize_model(copy.deepcopy(model))
    grads = []
    for m in (model, dense):
        lorakit.adapt(m, lorakit.AdapterConfig(r=4))
        _perturb(m)
        m.train()
        m(input_ids=ids(), labels=ids()).loss.backward()
        grads.append({name: p.grad for name, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], rtol=1e-5, atol=1e-6 * grads[1][name].abs().max().item()), name


def test_olora_is_exact_on_a_4bit_base_and_peft_adds_a_rounding(capsys):
    """lorakit's OLoRA never writes W − s·B0·A0 into the 4-bit weight, so its output at init equals the 4-bit base's;
    PEFT writes the residual back into the 4-bit weight (a second nf4 rounding)."""
    model = quantized("nf4")
    with torch.no_grad():
        reference = model(input_ids=ids()).logits
    ours = copy.deepcopy(model)
    lorakit.adapt(ours, config("olora"))
    with torch.no_grad():
        lorakit_error = (ours(input_ids=ids()).logits - reference).abs().max().item()
    from peft import LoraConfig, get_peft_model

    try:
        peft_model = get_peft_model(
            copy.deepcopy(model), LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights="olora")
        )
    except Exception as exc:  # record what PEFT does, not a guess
        pytest.fail(f"PEFT's OLoRA on a 4-bit base raised {type(exc).__name__}: {exc}")
    with torch.no_grad():
        peft_error = (peft_model(input_ids=ids()).logits - reference).abs().max().item()
    with capsys.disabled():
        print(f"\nOLoRA at init on nf4, max |logits - base|: lorakit {lorakit_error:.2e}, PEFT {peft_error:.2e}")
    assert lorakit_error <= 1e-5
    assert peft_error > 10 * max(lorakit_error, 1e-7)


def _perturb(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
def test_lora_equals_peft_with_equal_factors(scheme):
    from peft import LoraConfig, get_peft_model

    model = quantized(scheme)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft_model.train()  # bitsandbytes' eval-mode CPU path is another kernel (see lorakit.base_layers)
    model.train()
    lorakit.adapt(model, lorakit.AdapterConfig(r=4, alpha=8))
    _perturb(model)
    for name, layer in lorakit.adapter_layers(model):
        target = peft_model.base_model.model.get_submodule(name)
        with torch.no_grad():
            target.lora_A["default"].weight.copy_(layer.A)
            target.lora_B["default"].weight.copy_(layer.B)
    with torch.no_grad():
        diff = (model(input_ids=ids()).logits - peft_model(input_ids=ids()).logits).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_the_quantized_output_is_one_computation_in_training_and_eval(scheme):
    """bitsandbytes' CPU layers compute another function in eval than in training (int8: LLM.int8()'s input
    rounding in eval only); lorakit computes the training one in both, so what is scored is what was trained."""
    model = quantized(scheme)
    lorakit.adapt(model, lorakit.AdapterConfig(r=4))
    _perturb(model)
    outputs = {}
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            outputs[training] = model(input_ids=ids()).logits
    assert torch.equal(outputs[True], outputs[False])
    if scheme == "int8":  # the layer's own forward does switch, so the check above can fail
        layer = model.model.layers[0].mlp.up_proj.base_layer
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            own = {training: layer.train(training)(x) for training in (True, False)}
            ours = frozen_base(layer).output(x)
        assert (own[True] - own[False]).abs().max() > 1e-4
        assert torch.allclose(ours, own[True], rtol=1e-5, atol=1e-6)


def test_peft_export_of_a_4bit_adapter_loads_in_peft_on_that_base(tmp_path):
    from peft import PeftModel

    model = quantized("nf4")
    lorakit.adapt(model, lorakit.AdapterConfig(method="olora", r=4))
    _perturb(model)
    lorakit.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(quantized("nf4"), tmp_path / "peft", is_trainable=True)
    peft_model.train()  # bitsandbytes' eval-mode CPU path is another kernel (see lorakit.base_layers)
    model.train()
    with torch.no_grad():
        diff = (model(input_ids=ids()).logits - peft_model(input_ids=ids()).logits).abs().max().item()
    assert diff <= 1e-4, diff


def _load_warnings(model, directory, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.load_adapter(model, directory, **kwargs)
    return [str(w.message) for w in caught if "base" in str(w.message)]


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
def test_base_check_with_quantized_bases(scheme, tmp_path):
    trained = quantized(scheme)
    lorakit.adapt(trained, lorakit.AdapterConfig(r=4))
    lorakit.save_adapter(trained, tmp_path / "q")
    assert _load_warnings(quantized(scheme), tmp_path / "q") == []  # the same 4-bit base: silent
    onto_full = _load_warnings(base_model(), tmp_path / "q")
    assert len(onto_full) == 1 and f"trained on a {scheme} base and this base is float32" in onto_full[0]
    full = base_model()
    lorakit.adapt(full, lorakit.AdapterConfig(r=4))
    lorakit.save_adapter(full, tmp_path / "full")
    onto_quantized = _load_warnings(quantized(scheme), tmp_path / "full")
    assert len(onto_quantized) == 1 and f"this base is {scheme}" in onto_quantized[0]
    for directory in ("q", "full"):
        with pytest.raises(lorakit.BaseModelMismatchError, match="different weights"):
            lorakit.load_adapter(quantized(scheme, seed=1), tmp_path / directory)


def test_in_place_merge_is_refused_and_merge_and_unload_writes_full_precision():
    model = quantized("nf4")
    lorakit.adapt(model, lorakit.AdapterConfig(method="olora", r=4))
    _perturb(model)
    with pytest.raises(lorakit.ConfigError, match="run `lorakit merge` to write a full-precision merged model"):
        lorakit.merge(model)
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, lorakit.AdapterLayer))
    with torch.no_grad():
        adapted = model(input_ids=ids()).logits
        merged = lorakit.merge_and_unload(model)
        assert {type(m) for m in merged.modules() if isinstance(m, nn.Linear)} == {nn.Linear}
        diff = (merged(input_ids=ids()).logits - adapted).abs().max().item()
    assert diff <= 1e-5, diff
    assert model_quantization(merged)["quantization"] is None


def test_model_quantization_reports_scheme_and_bytes():
    full, nf4, int8 = (m.requires_grad_(False) for m in (base_model(), quantized("nf4"), quantized("int8")))
    assert model_quantization(full) == {"quantization": None, "base_bytes_per_parameter": 4.0}
    assert model_quantization(nf4)["quantization"] == "nf4"
    linear_only = Bitsandbytes4bit(nf4.model.layers[0].mlp.up_proj).bytes_per_parameter()
    assert 0.5 < linear_only < 0.52  # 4 bits + 8-bit absmax per 64 + its float32 per 256 blocks
    assert 1.0 < Bitsandbytes8bit(int8.model.layers[0].mlp.up_proj).bytes_per_parameter() < 1.05
    assert model_quantization(nf4)["base_bytes_per_parameter"] < model_quantization(int8)["base_bytes_per_parameter"]


def test_flat_lora_on_a_quantized_base_uses_a_temporary_dense_weight():
    """Flat-LoRA's W + ε on a 4-bit base: a temporary dequantized W + ε; the stored 4-bit weight never changes."""
    model = quantized("nf4")
    before = stored_bytes(model)
    lorakit.adapt(model, lorakit.AdapterConfig(r=4))
    layer = model.model.layers[0].mlp.up_proj

    class Noise:
        def perturbed(self, weight):
            return weight + 0.01

    layer.weight_noise = Noise()
    x = torch.randn(3, 128)
    expected = torch.nn.functional.linear(x, layer.frozen.dense_weight() + 0.01)
    assert torch.allclose(layer.base_output(x), expected, atol=1e-6)
    layer.weight_noise = None
    for key, value in stored_bytes(model).items():
        assert torch.equal(before[key], value)
