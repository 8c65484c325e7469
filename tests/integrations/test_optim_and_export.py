"""LoRA-RITE as the Trainer's optimizer (trains, checkpoints, resumes exactly), and PEFT export of a model trained
with the Trainer (PeftModel.from_pretrained gives the same logits)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import VARIANTS, tiny_llama
from trainer_helpers import INPUTS, adapted, logits, max_diff, train, trained

import lorakit
from lorakit import ConfigError

try:
    from lorakit.optim.rite import LoraRite
except ImportError as exc:  # another change is finishing it
    LoraRite, RITE_MISSING = None, f"lorakit.optim.rite.LoraRite is not importable: {exc}"
else:
    RITE_MISSING = ""


@pytest.mark.skipif(LoraRite is None, reason=RITE_MISSING or "-")
@pytest.mark.parametrize("variant", ["lora", "mini-orthonormal"])
def test_lora_rite_is_the_trainers_optimizer_and_resumes_exactly(variant, tmp_path):
    def run(out, resume=None):
        model = adapted(variant)
        trainer = train(model, out, resume=resume, optimizers=(LoraRite(model, lr=1e-2), None))
        return model, trainer

    whole, trainer = run(tmp_path / "whole")
    assert trainer.optimizer.optimizer.__class__ is LoraRite
    state = next(iter(trainer.optimizer.optimizer.state.values()))
    assert "basis" in state and "exp_avg_sq" in state  # RITE's own state, not Adam's
    adamw = adapted(variant)
    train(adamw, tmp_path / "adamw", save_strategy="no")
    assert max_diff(trained(whole), trained(adamw)) > 1e-4  # a different optimizer, visibly
    # the checkpoint's optimizer.pt holds RITE's state; a resume continues exactly
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")
    resumed, _ = run(tmp_path / "cut", resume=True)
    assert max_diff(trained(whole), trained(resumed)) <= 1e-6


@pytest.mark.skipif(LoraRite is None, reason=RITE_MISSING or "-")
def test_lora_rite_refuses_a_method_it_cannot_optimize_before_the_trainer_exists():
    with pytest.raises(ConfigError, match="LoraRite needs one") as info:
        LoraRite(adapted("mora"), lr=1e-2)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_peft_of_a_trainer_trained_adapter_loads_in_peft(variant, tmp_path):
    from peft import PeftModel

    model = adapted(variant)
    trainer = train(model, tmp_path / "run", max_steps=2, save_strategy="no")
    trainer.save_model(str(tmp_path / "final"))
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path / "final")
    try:
        lorakit.export_peft(reloaded, tmp_path / "peft")
    except ConfigError as exc:  # a method whose update is not low rank refuses by design (MoRA's rope)
        assert "cannot be exported as a PEFT LoRA" in str(exc) and "\n" not in str(exc)
        assert VARIANTS[variant]["method"] == "mora"
        return
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = peft_model(INPUTS).logits
    assert (theirs - logits(model)).abs().max().item() <= 1e-4
