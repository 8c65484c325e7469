"""`lorakit train --quantize` and `--gradient-checkpointing`: every method and procedure, resume, DDP, compare, merge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.compare.spec import parse_methods
from lorakit.methods import METHODS
from lorakit.quantize import quantize_model
from lorakit.training import TrainConfig, train
from lorakit.training.loop import enable_gradient_checkpointing
from tests.conftest import METHOD_SETTINGS, VOCAB, tiny_llama
from tests.training.test_train import adapter_tensors, max_diff
from tests.training.test_train import config as train_config

pytest.importorskip("bitsandbytes")
LORAKIT = [sys.executable, "-m", "lorakit"]


def config(model_dir, data, out, **overrides):
    """test_train's run config, 4 steps by default."""
    return train_config(model_dir, data, out, **{"steps": 4, **overrides})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradient_checkpointing_gives_the_same_gradients(method):
    """transformers' non-reentrant checkpointing on an adapted model: equal gradients within 1e-6 in fp32, with
    adapter dropout (its masks are replayed from the saved RNG state)."""
    settings = dict(method=method, r=4, dropout=0.1, **METHOD_SETTINGS.get(method, {}))
    if method == "mini":
        settings.update(mini_a=8, mini_b=8)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(**settings))
        with torch.no_grad():  # B = 0 at init would leave A without gradient: move every factor a little
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        torch.manual_seed(3)
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert model.model.gradient_checkpointing is checkpointing
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and plain
    worst = max((plain[n] - checkpointed[n]).abs().max().item() for n in plain)
    assert worst <= 1e-6, worst
    assert max(g.abs().max().item() for g in plain.values()) > 1e-4  # the comparison is not between zeros


def test_quantized_training_records_its_base_and_reloads(tiny_model_dir, instruction_file, tmp_path):
    out = tmp_path / "nf4"
    summary = train(config(tiny_model_dir, instruction_file, out, method="olora", quantize="nf4", steps=6))
    assert summary["quantization"] == "nf4" and summary["gradient_checkpointing"] is False
    assert 0 < summary["base_bytes_per_parameter"] < 4  # float32 embeddings and norms, 4-bit linear layers
    full = train(config(tiny_model_dir, instruction_file, tmp_path / "fp32", method="olora", steps=6))
    assert full["quantization"] is None and full["base_bytes_per_parameter"] == 4.0
    assert summary["final_train_loss"] != full["final_train_loss"]  # it trained on another (quantized) base
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same 4-bit base: no warning
        quantized = lorakit.load_adapter(
            quantize_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "nf4"), out / "adapter"
        )
    # OLoRA's A0, B0 come from the base weight: rebuilt from the float32 weight they are another model (a LoRA adapter
    # loads there with one warning, tests/test_base_layers.py)
    with pytest.raises(lorakit.BaseModelMismatchError, match="load it onto the nf4 base it was trained on"):
        lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    # lorakit eval rebuilds the base the adapter was trained on: no dtype warning, and the loss of that model
    evaluated = subprocess.run(
        LORAKIT + ["eval", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"), "--data",
                   str(instruction_file), "--limit", "8"], capture_output=True, text=True, check=True,
    )
    assert "the adapter was trained on a nf4 base; quantized" in evaluated.stderr
    assert "this base is float32" not in evaluated.stderr
    from lorakit.data import load_examples
    from lorakit.models import load_model
    from lorakit.training.evaluate import evaluate_loss

    _, tokenizer = load_model(str(tiny_model_dir))
    examples, _ = load_examples(str(instruction_file), tokenizer, 256)
    expected = evaluate_loss(quantized, examples[:8], 4, tokenizer.pad_token_id or 0, torch.device("cpu"))
    assert abs(json.loads(evaluated.stdout.strip().splitlines()[-1])["eval_loss"] - expected["eval_loss"]) <= 1e-6
    # lorakit merge: the full-precision model of the dequantized nf4 weights plus the update
    merged_dir = tmp_path / "merged"
    run = subprocess.run(
        LORAKIT + ["merge", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"), "--out", str(merged_dir)],
        capture_output=True, text=True, check=True,
    )
    assert "onto the dequantized nf4 weights" in run.stdout
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert {type(m) for m in merged.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    quantized.train()  # one computation in both modes (lorakit.base_layers); the merged model has no dropout
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - quantized(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize(
    "settings", [dict(quantize="nf4"), dict(quantize="int8", gradient_checkpointing=True), dict(quantize="torchao-nf4")]
)
def test_resume_is_exact(settings, tiny_model_dir, instruction_file, tmp_path):
    """A run restarted from its step-3 checkpoint ends bit for bit where the uninterrupted run ended."""
    whole = tmp_path / "whole"
    train(config(tiny_model_dir, instruction_file, whole, steps=6, save_every=3, dropout=0.1, **settings))
    resumed = Path(shutil.copytree(whole, tmp_path / "resumed"))
    shutil.rmtree(resumed / "adapter")
    (resumed / "summary.json").unlink()
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-000003"]
    train(config(tiny_model_dir, instruction_file, resumed, steps=6, save_every=3, dropout=0.1, resume=True,
                 **settings))
    assert max_diff(adapter_tensors(whole), adapter_tensors(resumed)) == 0.0


def test_torchao_nf4_training_records_its_base_and_reloads(tiny_model_dir, instruction_file, tmp_path, capsys):
    """`--quantize torchao-nf4`: every linear but the head gets a torchao NF4Tensor weight; summary.json records it,
    the adapter loads silently onto the same base, and `lorakit eval` and `lorakit merge` rebuild that base."""
    from lorakit.base_layers import TorchaoNF4, frozen_base
    from lorakit.cli import main

    out = tmp_path / "torchao"
    summary = train(config(tiny_model_dir, instruction_file, out, quantize="torchao-nf4", steps=6))
    assert summary["quantization"] == "torchao-nf4" and 0 < summary["base_bytes_per_parameter"] < 4
    model = quantize_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "torchao-nf4")
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()]
    assert linear and all(isinstance(frozen_base(m), TorchaoNF4) for m in linear)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same torchao NF4 base: no warning
        quantized = lorakit.load_adapter(model, out / "adapter")
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"), "--data",
                 str(instruction_file), "--limit", "8"]) == 0
    evaluated = capsys.readouterr()
    assert "the adapter was trained on a torchao-nf4 base; quantized" in evaluated.err
    assert "this base is float32" not in evaluated.err
    from lorakit.data import load_examples
    from lorakit.models import load_model
    from lorakit.training.evaluate import evaluate_loss

    _, tokenizer = load_model(str(tiny_model_dir))
    examples, _ = load_examples(str(instruction_file), tokenizer, 256)
    expected = evaluate_loss(quantized, examples[:8], 4, tokenizer.pad_token_id or 0, torch.device("cpu"))
    assert abs(json.loads(evaluated.out.strip().splitlines()[-1])["eval_loss"] - expected["eval_loss"]) <= 1e-6
    with pytest.warns(UserWarning, match="this base is float32"):
        plain = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
    plain = evaluate_loss(plain, examples[:8], 4, tokenizer.pad_token_id or 0, torch.device("cpu"))
    assert plain["eval_loss"] != expected["eval_loss"]  # one warning onto float32, another loss: eval rebuilt NF4
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"), "--out",
                 str(merged_dir)]) == 0
    assert "onto the dequantized torchao-nf4 weights" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    quantized.train()
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - quantized(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("procedure", ["flat:rho=0.05", "cola:links=2", "xgblora", "increlora"])
def test_every_procedure_on_nf4_with_and_without_checkpointing(procedure, tiny_model_dir, instruction_file, tmp_path):
    runs = {}
    for checkpointing in (False, True):
        out = tmp_path / f"gc-{checkpointing}"
        summary = train(config(tiny_model_dir, instruction_file, out, procedure=procedure, quantize="nf4", steps=6,
                               gradient_checkpointing=checkpointing))
        assert summary["quantization"] == "nf4" and summary["gradient_checkpointing"] is checkpointing
        runs[checkpointing] = adapter_tensors(out)
    assert max_diff(runs[False], runs[True]) <= 1e-5


def test_ddp_with_a_quantized_base_equals_one_process(tiny_model_dir, instruction_file, tmp_path):
    def argv(out, batch_size):
        return ["train", *config(tiny_model_dir, instruction_file, out, quantize="nf4", batch_size=batch_size,
                                 gradient_checkpointing=True).to_argv()]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit"]
    subprocess.run(torchrun + argv(tmp_path / "ddp", 2), check=True, capture_output=True)
    subprocess.run(LORAKIT + argv(tmp_path / "one", 4), check=True, capture_output=True)
    assert max_diff(adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "ddp")) <= 1e-5
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["quantization"] == "nf4"


def test_compare_takes_quantization_and_checkpointing_per_variant_and_for_all():
    specs = parse_methods("lora,lora:quantize=nf4:checkpointing=1,mini:quantize=int8")
    assert [s.overrides for s in specs] == [
        {}, {"quantize": "nf4", "gradient_checkpointing": True}, {"quantize": "int8"}
    ]
    argv = TrainConfig(out="o", quantize="fp4", gradient_checkpointing=True).to_argv()
    assert argv[argv.index("--quantize") + 1] == "fp4" and "--gradient-checkpointing" in argv
    from lorakit.cli import build_parser

    args = build_parser().parse_args(["compare", "--quantize", "nf4", "--gradient-checkpointing", "--out", "o"])
    assert TrainConfig.from_args(args).quantize == "nf4" and TrainConfig.from_args(args).gradient_checkpointing
