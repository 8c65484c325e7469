"""The extension points of the training loop.

A `Procedure` changes how training runs without editing the loop. The loop calls its hooks at four moments, each
with the same `TrainingState` (model, optimizer, scheduler, step, ...):

    on_train_begin        once, after the adapter, the optimizer and any checkpoint are in place
    before_step           before the first micro-batch of optimizer step `state.step` (0-based)
    after_backward        the step's gradients are complete (summed over micro-batches, averaged over
                          processes) and at their true scale (under fp16 already divided by the loss scale);
                          the optimizer has not stepped yet
    after_optimizer_step  after optimizer.step(), scheduler.step() and zero_grad()

They map one-to-one onto transformers' `TrainerCallback.on_step_begin`, `on_pre_optimizer_step` and
`on_step_end`, so the same procedure can run inside the Trainer. The Trainer unscales fp16 gradients before
`on_pre_optimizer_step` (its gradient clipping, or with max_grad_norm=0 its gradient norm, calls Accelerate's
`clip_grad_norm_`, which unscales), and `lorakit train` unscales them before `after_backward`.

A procedure's state is what `state_dict()` returns (JSON values): the loop writes it into every checkpoint and
hands it back through `load_state_dict()` on --resume, so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from ..methods.lora import LoraLayer
from ..options import Option


def plain_lora(layer, a, b) -> LoraLayer:
    """A plain LoRA on `layer`'s base weight with ΔW = B·A exactly (alpha = rank: scale 1), the form in which Chain
    of LoRA, XGBLoRA and IncreLoRA save their final adapters, relative to the ORIGINAL base."""
    rank = a.shape[0]
    source = layer.config
    config = AdapterConfig(
        method="lora", r=rank, alpha=rank, targets=source.targets, seed=source.seed, dropout=source.dropout
    )
    lora = LoraLayer(layer.base_layer, config, layer.name, initialize=False, fingerprint=layer.base_fingerprint)
    lora.load_tensors({"A": a, "B": b})
    return lora


@dataclass
class TrainingState:
    model: nn.Module  # the adapted model, unwrapped (no DDP wrapper)
    optimizer: Any
    scheduler: Any
    step: int  # 0-based index of the optimizer step about to run (before_step) or just run (after_*)
    total_steps: int
    seed: int
    process_index: int = 0
    num_processes: int = 1


class Procedure:
    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    supports_fsdp: ClassVar[bool] = False

    def __init__(self, options: dict):
        self.settings = {key: options.get(key, option.default) for key, option in self.options.items()}

    def adapter_config(self, config):
        """The adapter config the run builds, given the one its flags describe; called by `lorakit train` before
        the model is adapted and on --resume (so the procedure settles its settings either way). IncreLoRA: --rank
        is the average rank of the budget, and the layers are allocated at the per-module capacity."""
        return config

    def on_train_begin(self, state: TrainingState) -> None:
        pass

    def before_step(self, state: TrainingState) -> None:
        pass

    def after_backward(self, state: TrainingState) -> None:
        pass

    def after_optimizer_step(self, state: TrainingState) -> None:
        pass

    def check(self, model: nn.Module) -> None:
        """What every procedure refuses, then the procedure's own `check_model`: called before training starts."""
        from ..expert_lora import expert_loras

        experts = next(expert_loras(model), None)
        if experts is not None:
            raise ConfigError(
                f"procedure {self.name} works on the linear adapter layers, but {experts[0]} has a LoRA on its expert "
                "parameters (target_parameters), which it would leave out; drop target_parameters or the procedure"
            )
        self.check_model(model)

    def check_model(self, model: nn.Module) -> None:
        """Refuse (ConfigError, one line) a model this procedure cannot train, before training starts."""

    def state_dict(self) -> dict:
        """JSON-able state, written into every checkpoint."""
        return {}

    def state_tensors(self, model: nn.Module) -> dict:
        """Tensor state ({name: tensor}), written into every checkpoint as procedure.safetensors."""
        return {}

    def load_state_dict(self, state: dict, tensors: dict, model: nn.Module) -> None:
        pass

    def layers_to_save(self, model: nn.Module) -> dict | None:
        """The adapter layers the run's final adapter consists of, if not the model's own (see save_adapter)."""
        return None

    def report(self) -> dict:
        """Figures of the run for summary.json ("procedure_report"), e.g. per-module ranks."""
        return {}

    def describe(self) -> str:
        return self.name + "".join(f":{k}={v}" for k, v in self.settings.items())
