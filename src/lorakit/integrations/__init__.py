"""lorakit adapters inside the trainers users already run: transformers' `Trainer` and TRL's `SFTTrainer`.

    model = lorakit.adapt(model, cfg)
    trainer = Trainer(model=model, args=args, train_dataset=data)      # or trl.SFTTrainer(...), unchanged
    trainer.train(); trainer.save_model("out")                          # out/ is a lorakit adapter directory
    model = lorakit.load_adapter(fresh_base, "out")

The approach: hooks on the adapted model (`install_trainer_hooks`, see `hf.py`), not a Trainer subclass or a
callback, because the Trainer reaches the model through exactly two doors: `model.save_pretrained(dir)` for
`save_model` and every `checkpoint-N/`, and `model.load_state_dict(<dir>/model.safetensors)` for
`train(resume_from_checkpoint=...)` and `load_best_model_at_end`. lorakit takes over both on the model itself, so
the Trainer, TRL's trainers and any Trainer subclass need no change. Training procedures (Flat-LoRA, Chain of
LoRA) plug in as a `ProcedureCallback`.
"""

from __future__ import annotations

from .hf import (
    RESUME_FILE,
    install_trainer_hooks,
    load_adapter_into,
    remove_trainer_hooks,
    save_for_trainer,
    trainer_hooks_installed,
)

__all__ = [
    "RESUME_FILE",
    "ProcedureCallback",
    "install_trainer_hooks",
    "load_adapter_into",
    "remove_trainer_hooks",
    "save_for_trainer",
    "trainer_hooks_installed",
]


def __getattr__(name: str):
    # transformers.TrainerCallback is imported only when asked for: `lorakit.adapt` installs the hooks through
    # `hf.py`, which must stay light
    if name == "ProcedureCallback":
        from .callbacks import ProcedureCallback

        return ProcedureCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
