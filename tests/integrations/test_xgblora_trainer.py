"""XGBLoRA inside transformers' Trainer: fp16 loss scaling leaves the regulariser alone (the Trainer's gradient norm
unscales the gradients before `on_pre_optimizer_step`)."""

from __future__ import annotations

import torch
from trainer_helpers import adapted, arguments, logits, token_data
from transformers import Trainer, TrainerCallback

from lorakit.integrations import ProcedureCallback

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
