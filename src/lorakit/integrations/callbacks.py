"""`ProcedureCallback`: a lorakit training procedure (`lorakit.procedures`: flat, cola, ...) inside transformers'
Trainer or TRL's trainers, on the same extension points as `lorakit train`.

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ProcedureCallback("flat", rho=0.05)])

Where each hook runs (transformers 5.x `Trainer._run_epoch`, one optimizer step):

    on_step_begin           before the first micro-batch                                 -> before_step
    (forward + backward of every micro-batch, gradient clipping if max_grad_norm > 0)
    on_pre_optimizer_step   the gradients are complete, before optimizer.step()          -> after_backward
    (optimizer.step(), on_optimizer_step, lr_scheduler.step(), zero_grad, global_step += 1)
    on_step_end             after all of that                                            -> after_optimizer_step

`TrainingState.step` is the 0-based index of the step (`state.global_step` before it, `global_step - 1` at its
end), `total_steps` is `state.max_steps`, `seed` is `args.seed`; model, optimizer and scheduler are the objects
the Trainer hands every callback (the unwrapped model, its optimizer, its scheduler). One difference from
`lorakit train`: the Trainer clips gradients (max_grad_norm, default 1.0) before `after_backward` (XGBLoRA, which
clips its own round's gradients in `after_backward`, refuses max_grad_norm > 0).

The procedure's state travels in the Trainer's checkpoints: `save_model` and every `checkpoint-N/` write its final
adapter (`layers_to_save`) as the lorakit adapter and its `state_dict` / `state_tensors` into the resume file, and
`train(resume_from_checkpoint=...)` gives them back through `load_state_dict` before the first step (see `hf.py`).
"""

from __future__ import annotations

import contextlib

from transformers import TrainerCallback

from ..errors import ConfigError
from ..inject import is_adapted
from ..options import validate_options
from ..procedures.base import Procedure, TrainingState
from .hf import attach_procedure


def make_procedure(procedure, options: dict) -> Procedure:
    """A Procedure from an instance, a registered name, or "name:key=value,..." plus keyword options."""
    from ..procedures import PROCEDURES, parse_procedure

    if isinstance(procedure, Procedure):
        if options:
            raise ConfigError("ProcedureCallback: pass options with a procedure name, not with an instance")
        return procedure
    if not isinstance(procedure, str):
        raise ConfigError(
            f"ProcedureCallback takes a procedure name ({', '.join(sorted(PROCEDURES))}) or a Procedure, not a "
            f"{type(procedure).__name__}"
        )
    try:
        name, parsed = parse_procedure(procedure)
        parsed.update(validate_options(name, PROCEDURES[name].options, {k: str(v) for k, v in options.items()}))
    except ConfigError as exc:
        raise ConfigError(f"ProcedureCallback: {str(exc).replace('--procedure ', 'procedure ')}") from None
    return PROCEDURES[name](parsed)


@contextlib.contextmanager
def _in_callback():
    """A procedure's one-line refusal, worded for the callback rather than the `lorakit train` flag."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"ProcedureCallback: {str(exc).replace('--procedure ', 'procedure ')}") from None


class ProcedureCallback(TrainerCallback):
    """Run a lorakit training procedure inside transformers' Trainer (or TRL's trainers); see the module doc.

    `procedure`: a name ("flat", "cola"), a "name:key=value,..." string, or a `Procedure` instance; `options`:
    the procedure's options as keywords (ProcedureCallback("cola", links=3)). A procedure that cannot train the
    model, or cannot run inside the Trainer's setup, is refused with one line when the Trainer is created.
    """

    def __init__(self, procedure, **options):
        self.procedure = make_procedure(procedure, options)
        self.moment: TrainingState | None = None

    def _prepare(self, args, model) -> None:
        procedure = self.procedure
        name = procedure.name
        if model is None or not is_adapted(model):
            raise ConfigError(
                f"ProcedureCallback({name!r}) needs a lorakit-adapted model; call lorakit.adapt(model, config) "
                "before creating the Trainer"
            )
        refusal = getattr(type(procedure), "trainer_refusal", None)
        if refusal:
            raise ConfigError(f"procedure {name} cannot run inside the transformers Trainer: {refusal}")
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            raise ConfigError(
                f"procedure {name} cannot run under DeepSpeed: DeepSpeed steps the optimizer inside its engine, "
                "before the callback between backward and the optimizer step; train without DeepSpeed"
            )
        if getattr(args, "load_best_model_at_end", False):
            raise ConfigError(
                f"procedure {name} cannot follow load_best_model_at_end (the Trainer reloads a checkpoint after the "
                "last step, where a procedure cannot re-enter its state); turn it off and load the best checkpoint "
                "afterwards: lorakit.load_adapter(base, trainer.state.best_model_checkpoint)"
            )
        if getattr(type(procedure), "clips_gradients", False) and (getattr(args, "max_grad_norm", 0) or 0) > 0:
            raise ConfigError(
                f"procedure {name} clips its round's gradients itself (after its regulariser, without the other "
                f"layers), but the Trainer clips every gradient first (max_grad_norm={args.max_grad_norm}); set "
                f"TrainingArguments(max_grad_norm=0) and ProcedureCallback({name!r}, max_grad_norm=...) instead"
            )
        if getattr(args, "fsdp", None) and not procedure.supports_fsdp:
            raise ConfigError(f"procedure {name} does not support FSDP (the weights are shards there); use DDP")
        with _in_callback():
            procedure.check(model)
        attach_procedure(model, procedure)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._prepare(args, model)  # refuse before training starts; attach before a resume loads the checkpoint

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self._prepare(args, model)
        self.moment = TrainingState(
            model,
            optimizer,
            lr_scheduler,
            state.global_step,
            state.max_steps,
            args.seed,
            args.process_index,
            args.world_size,
        )
        with _in_callback():  # a procedure may refuse the Trainer's optimizer or precision here, before step 1
            self.procedure.on_train_begin(self.moment)

    def on_step_begin(self, args, state, control, **kwargs):
        self.moment.step = state.global_step
        self.procedure.before_step(self.moment)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.procedure.after_backward(self.moment)

    def on_step_end(self, args, state, control, **kwargs):
        self.moment.step = state.global_step - 1
        self.procedure.after_optimizer_step(self.moment)
