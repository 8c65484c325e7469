"""XGBLoRA inside transformers' Trainer: fp16 loss scaling leaves the regulariser alone (the Trainer's gradient norm
unscales the gradients before `on_pre_optimizer_step`), and clipping is the procedure's, the same as in lorakit's
own loop."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import adapted, arguments, logits, token_data, train
from transformers import Trainer, TrainerCallback

from lorakit import ConfigError
from lorakit.integrations import ProcedureCallback
from lorakit.procedures.base import TrainingState
from lorakit.procedures.xgblora import XGBLora

XGB = "xgblora:rounds=1,layers=1,lam=0.001"


class LossScaling(TrainerCallback):
    """Turns on Accelerate's native fp16 loss scaling with a CPU GradScaler once the model is prepared (so the
    forward is not autocast to fp16 on CPU: only the scaling differs from a run without it)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.accelerator.native_amp = True


def train_xgblora(out, scale: float | None, steps: int = 6, **overrides):
    model = adapted("lora", r=2)
    trainer = Trainer(
        model=model,
        args=arguments(out, max_steps=steps, save_strategy="no", fp16=True, **overrides),
        train_dataset=token_data(),
        callbacks=[ProcedureCallback(XGB)],
    )
    if scale is not None:
        # before train(): Accelerate hands this scaler to the AcceleratedOptimizer it prepares
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        trainer.add_callback(LossScaling(trainer))
    trainer.train()
    return model, trainer


def test_fp16_loss_scale_leaves_the_regulariser_at_its_weight(tmp_path):
    # max_grad_norm=0: no clipping, yet the Trainer's gradient norm (Accelerate's clip_grad_norm_) unscales
    plain, _ = train_xgblora(tmp_path / "plain", None, max_grad_norm=0.0)
    scaled, trainer = train_xgblora(tmp_path / "scaled", 1024.0, max_grad_norm=0.0)
    assert trainer.accelerator.scaler.get_scale() == 1024.0  # it scaled every step and skipped none
    # the boosters are folded at the end of each round (the live factors start again): compare the models
    assert (logits(plain) - logits(scaled)).abs().max().item() <= 1e-6


def test_the_trainers_clipping_is_refused(tmp_path):
    """The Trainer clips every layer's loss gradient before on_pre_optimizer_step; XGBLoRA clips the round's
    gradient of loss + regulariser itself, in both loops."""
    with pytest.raises(ConfigError) as info:
        Trainer(model=adapted("lora", r=2), args=arguments(tmp_path), callbacks=[ProcedureCallback(XGB)])
    assert "TrainingArguments(max_grad_norm=0) and ProcedureCallback('xgblora', max_grad_norm=...)" in str(info.value)
    assert "\n" not in str(info.value)


def test_both_loops_take_the_same_step_with_clipping(tmp_path):
    """One step with clipping: the Trainer (max_grad_norm=0, the procedure clips) and lorakit train's order of hooks
    (backward, after_backward, optimizer step, after_optimizer_step) on the same batch give the same model."""
    options = {"rounds": 1, "layers": 1, "lam": 0.01, "max_grad_norm": 1e-3}
    data = token_data(count=4)  # one batch of 4: the whole data set, whatever the sampler's order
    in_trainer = adapted("lora", r=2)
    seen = []
    procedure = XGBLora(options)
    procedure.after_backward = record_norm(procedure.after_backward, in_trainer, seen)
    train(
        in_trainer,
        tmp_path,
        data=data,
        callbacks=[ProcedureCallback(procedure)],
        max_steps=1,
        save_strategy="no",
        max_grad_norm=0.0,
        weight_decay=0.0,
        optim="adamw_torch",
    )
    assert seen[0][0] > 1e-2 and seen[0][1] == pytest.approx(1e-3, rel=1e-5)  # clipped: 0.45 -> 1e-3

    own = adapted("lora", r=2)
    xgb = XGBLora(options)
    optimizer = torch.optim.AdamW([p for p in own.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    moment = TrainingState(own, optimizer, None, 0, 1, 0)
    xgb.on_train_begin(moment)
    xgb.before_step(moment)
    ids = torch.tensor(data["input_ids"])
    own(input_ids=ids, labels=ids).loss.backward()
    xgb.after_backward(moment)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    xgb.after_optimizer_step(moment)  # the last step: the booster is folded
    assert (logits(own) - logits(adapted("lora", r=2))).abs().max().item() > 1e-3  # the step moved the model
    assert (logits(in_trainer) - logits(own)).abs().max().item() <= 1e-6


def record_norm(after_backward, model, seen):
    """Wrap after_backward: record the picked layers' gradient norm before (loss only) and after it."""

    def norm():
        grads = [p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None]
        return torch.cat(grads).norm().item()

    def wrapped(state):
        before = norm()  # every layer's here; the round's after
        after_backward(state)
        seen.append((before, norm()))

    return wrapped
