"""`lorakit train --modules-to-save / --add-tokens`, then eval and generate with that adapter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_commands import run
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit

NEW = ["<tool>", "</tool>"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    data = root / "tools.jsonl"
    rows = [{"instruction": f"Call tool {i}", "output": f"<tool>add {i}</tool>"} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "run"
    run(
        "train", "--model", tiny_model_dir, "--data", data, "--targets", "q_proj,v_proj", "--modules-to-save",
        "norm", "--add-tokens", ",".join(NEW), "--rank", "2", "--steps", "3", "--batch-size", "4", "--lr", "1e-2",
        "--max-length", "32", "--quiet", "--out", out,
    )  # fmt: skip
    return out, data


def test_train_adds_the_tokens_and_saves_tokenizer_and_modules(trained, tiny_model_dir):
    out, _ = trained
    base_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter" / "tokenizer")
    ids = tokenizer.convert_tokens_to_ids(NEW)
    assert ids == [base_tokens, base_tokens + 1] and len(tokenizer) == base_tokens + 2
    assert tokenizer("<tool>x</tool>")["input_ids"][0] == ids[0]  # one token, never split
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["trainable_tokens"]["ids"] == ids and meta["trainable_tokens"]["tied"] is False
    assert list(meta["modules_to_save"]) == ["model.norm"]
    assert meta["config"]["trainable_tokens"] == ids and meta["config"]["modules_to_save"] == ["norm"]


def test_eval_and_generate_load_the_saved_tokenizer(trained, tiny_model_dir):
    out, data = trained
    result = json.loads(run("eval", "--model", tiny_model_dir, "--adapter", out / "adapter", "--data", data).stdout)
    # the same loss by hand: the base resized to the saved tokenizer, the adapter on top
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter" / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model = lorakit.load_adapter(model, out / "adapter").eval()
    from lorakit.data import load_examples
    from lorakit.training.evaluate import evaluate_loss

    examples, _ = load_examples(str(data), tokenizer, 256)
    expected = evaluate_loss(model, examples, 8, tokenizer.pad_token_id or 0, torch.device("cpu"))
    assert result["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-5)
    assert run("generate", "--model", tiny_model_dir, "--adapter", out / "adapter", "--prompt", "Call tool 3",
               "--max-new-tokens", "4").returncode == 0  # fmt: skip


def test_an_adapter_with_added_tokens_refuses_a_model_without_them_in_python(trained, tiny_model_dir, tmp_path):
    out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(lorakit.BaseModelMismatchError, match="resize_token_embeddings"):
        lorakit.load_adapter(model, out / "adapter")
    # the CLI resizes the base to the adapter's rows even without the tokenizer directory
    copy = shutil.copytree(out / "adapter", tmp_path / "adapter")
    shutil.rmtree(copy / "tokenizer")
    assert run("generate", "--model", tiny_model_dir, "--adapter", copy, "--prompt", "hi",
               "--max-new-tokens", "2").returncode == 0  # fmt: skip


def test_inspect_lists_the_saved_modules_and_token_rows(trained):
    out, _ = trained
    lines = run("inspect", out / "adapter").stdout.splitlines()
    assert "trained in full: model.norm (LlamaRMSNorm: weight 32)" in lines
    tokens = next(line for line in lines if line.startswith("token rows:"))
    assert "2 ids" in tokens and "model.embed_tokens (embedding), lm_head (head); head tied: False" in tokens
