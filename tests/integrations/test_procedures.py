"""Training procedures (Flat-LoRA, Chain of LoRA) as Trainer callbacks: the hooks run at the loop's moments, the
procedure changes training, its final adapter is what save_model writes, its state survives a resume exactly, and
what cannot work is refused in one line before training."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_llama
from trainer_helpers import adapted, arguments, frozen, logits, max_diff, token_data, train, trained
from transformers import Trainer

import lorakit
from lorakit import ConfigError
from lorakit.integrations import ProcedureCallback
from lorakit.procedures.base import Procedure

# name -> (variant, procedure, AdapterConfig overrides); as in tests/procedures/test_in_training.py
PROCEDURES = {
    "flat": ("lora", "flat:rho=0.5", {}),  # a large ρ so that the noise visibly matters on a tiny model
    "cola": ("lora", "cola:links=3", {}),  # knots after steps 2 and 4: the resume starts right after one
    "cola-rewarm-mini": ("mini-orthonormal", "cola:links=2,schedule=rewarm,rewarm_steps=2", {}),
    "increlora": ("lora", "increlora:target_rank=2,warmup=0,interval=1,top_h=5,rewarm_steps=2", {}),  # grows at 1-3
    "xgblora": ("lora", "xgblora:rounds=3,layers=1,lam=0.01", dict(r=2)),  # rounds start at steps 2, 4
}
TRAINER_ARGS = {"xgblora": dict(max_grad_norm=0.0)}  # it refuses the Trainer's clipping (it clips itself)


class Recorder(Procedure):
    """Records what it sees at each extension point."""

    name = "recorder"

    def __init__(self, model):
        super().__init__({})
        self.events, self.forwards = [], 0
        self.param = next(p for n, p in model.named_parameters() if n.endswith(".B"))  # B = 0: A's first grad is 0
        model.register_forward_hook(lambda *args: setattr(self, "forwards", self.forwards + 1))

    def on_train_begin(self, state):
        self.events.append(("begin", state.step, state.total_steps, state.seed, state.optimizer, state.scheduler))

    def before_step(self, state):
        self.events.append(("before", state.step, self.forwards, self.param.grad, self.param.detach().clone()))

    def after_backward(self, state):
        grad = None if self.param.grad is None else self.param.grad.clone()
        self.events.append(("backward", state.step, self.forwards, grad, self.param.detach().clone()))

    def after_optimizer_step(self, state):
        self.events.append(("optimizer", state.step, self.forwards, self.param.grad, self.param.detach().clone()))


def test_hooks_run_where_the_loop_runs_them(tmp_path):
    model = adapted("lora")
    recorder = Recorder(model)
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2, seed=7),
        train_dataset=token_data(),
        callbacks=[ProcedureCallback(recorder)],
    )
    trainer.train()
    begin, *steps = recorder.events
    assert begin[1:4] == ("begin", 0, 3, 7)[1:] and begin[4] is trainer.optimizer and begin[5] is trainer.lr_scheduler
    assert [e[:2] for e in steps] == [(kind, s) for s in range(3) for kind in ("before", "backward", "optimizer")]
    for s in range(3):
        before, backward, after = steps[3 * s : 3 * s + 3]
        assert before[2] == 2 * s and before[3] is None  # before the step's first micro-batch, gradients zeroed
        assert backward[2] == 2 * s + 2 and backward[3] is not None  # after BOTH micro-batches' backward ...
        assert torch.equal(backward[4], before[4])  # ... and before the optimizer step
        assert after[3] is None and not torch.equal(after[4], backward[4])  # stepped, gradients cleared


@pytest.mark.parametrize("name", list(PROCEDURES))
def test_procedure_trains_saves_and_resumes_exactly(name, tmp_path):
    variant, text, overrides = PROCEDURES[name]
    settings = dict(max_steps=6, save_steps=2, **TRAINER_ARGS.get(name, {}))

    def run(out, resume=None):
        model = adapted(variant, **overrides)
        train(model, out, resume=resume, callbacks=[ProcedureCallback(text)], **settings)
        return model

    whole = run(tmp_path / "whole")
    plain = adapted(variant, **overrides)
    train(plain, tmp_path / "plain", **settings)
    assert (logits(whole) - logits(plain)).abs().max() > 1e-4  # the procedure changes training
    # the final adapter is the procedure's (Chain of LoRA: every link as one LoRA) and loads onto the ORIGINAL base
    Trainer(model=whole, args=arguments(tmp_path / "unused")).save_model(str(tmp_path / "final"))
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path / "final")
    assert torch.allclose(logits(reloaded), logits(whole), atol=1e-5, rtol=0)
    if name != "flat":  # the procedure's final form: every link / booster / active rank as one plain LoRA (a
        # chain of LoRA-Mini links as one compact LoRA-Mini)
        expected = "mini" if variant.startswith("mini") else "lora"
        assert json.loads((tmp_path / "final" / "adapter.json").read_text())["method"] == expected
    # resume after the step-2 checkpoint as if killed there (Chain of LoRA: right after a knot)
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for later in ("checkpoint-4", "checkpoint-6"):
        shutil.rmtree(tmp_path / "cut" / later)
    resumed = run(tmp_path / "cut", resume=True)
    assert max_diff(trained(whole), trained(resumed)) == 0  # measured 0 for every procedure: bit-exact
    assert torch.equal(logits(whole), logits(resumed))  # finished links restored too (measured 0)  # finished links restored too


@pytest.mark.parametrize(
    "variant, text, overrides",
    [("olora", "cola:links=3", {}), ("loraxs", "xgblora:rounds=3,layers=2,lam=0.01", dict(r=2))],
    ids=["cola-olora", "xgblora-loraxs"],
)
def test_a_resumed_trainer_rederives_a_later_links_init(variant, text, overrides, tmp_path):
    """The Trainer's resume path (RESUME_FILE, then the procedure's links): a link after the first was initialised on
    W + ΣΔW (OLoRA's QR, LoRA-XS's SVD), and the resumed run rederives it, bit for bit."""
    settings = dict(max_steps=6, save_steps=2, **({"max_grad_norm": 0.0} if text.startswith("xgblora") else {}))

    def run(out, resume=None):
        model = adapted(variant, **overrides)
        train(model, out, resume=resume, callbacks=[ProcedureCallback(text)], **settings)
        return model

    whole = run(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for later in ("checkpoint-4", "checkpoint-6"):
        shutil.rmtree(tmp_path / "cut" / later)
    resumed = run(tmp_path / "cut", resume=True)
    assert max_diff(trained(whole), trained(resumed)) == 0  # measured 0
    assert torch.equal(logits(whole), logits(resumed))


def test_flat_noise_exists_only_inside_a_step(tmp_path):
    model = adapted("lora")
    seen = []
    layer = model.model.layers[0].self_attn.q_proj
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.weight_noise is not None))
    base = frozen(model)
    train(model, tmp_path, max_steps=3, save_strategy="no", callbacks=[ProcedureCallback("flat", rho=0.5)])
    assert seen == [False, True, True]  # f(0) = 0: no noise at the first step
    assert layer.weight_noise is None and max_diff(base, frozen(model)) == 0


def test_procedure_state_is_required_to_resume_its_checkpoint(tmp_path):
    train(adapted("lora"), tmp_path / "cola", max_steps=4, callbacks=[ProcedureCallback("cola", links=2)])
    train(adapted("lora"), tmp_path / "plain", max_steps=4)
    cases = [
        (tmp_path / "cola", [], "trained with procedure cola:links=2"),
        (tmp_path / "cola", [ProcedureCallback("cola", links=3)], "the Trainer has cola:links=3"),
        (tmp_path / "plain", [ProcedureCallback("flat")], "trained without a procedure"),
    ]
    for out, callbacks, words in cases:
        with pytest.raises(ConfigError, match=words) as info:
            train(adapted("lora"), out, resume=True, max_steps=6, callbacks=callbacks)
        assert "\n" not in str(info.value)


class NotInTrainer(Procedure):
    name = "needs-own-loop"
    trainer_refusal = "it needs the whole global batch at once, which the Trainer never holds"


@pytest.mark.parametrize(
    ("variant", "procedure", "words"),
    [
        ("lorta", "cola", "cannot chain lorta"),
        ("mora", "cola", "cannot chain mora"),
        ("lora", "nope", "procedure 'nope' is unknown; use one of: "),
        ("lora", "flat:rho=-1", "rho=-1"),
        ("lora", NotInTrainer({}), "cannot run inside the transformers Trainer: it needs the whole global batch"),
    ],
)
def test_refusals_are_one_line_before_training(variant, procedure, words, tmp_path):
    model = adapted(variant)
    before = trained(model)
    with pytest.raises(ConfigError) as info:
        Trainer(
            model=model, args=arguments(tmp_path), train_dataset=token_data(), callbacks=[ProcedureCallback(procedure)]
        )
    assert words in str(info.value) and "\n" not in str(info.value)
    assert max_diff(before, trained(model)) == 0


def test_load_best_model_at_end_is_refused_with_a_procedure(tmp_path):
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True)
    with pytest.raises(ConfigError, match="cannot follow load_best_model_at_end") as info:
        Trainer(
            model=adapted(),
            args=args,
            train_dataset=token_data(),
            eval_dataset=token_data(8, seed=1),
            callbacks=[ProcedureCallback("cola")],
        )
    assert "best_model_checkpoint" in str(info.value) and "\n" not in str(info.value)


def test_a_procedure_refusing_the_trainers_optimizer_stops_before_the_first_step(tmp_path):
    from lorakit.optim.rite import LoraRite

    model = adapted("lora")
    before = trained(model)
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=token_data(),
        optimizers=(LoraRite(model, lr=1e-2), None),
        callbacks=[ProcedureCallback(PROCEDURES["increlora"][1])],
    )
    with pytest.raises(ConfigError, match="ProcedureCallback: procedure increlora trains with AdamW") as info:
        trainer.train()
    assert "\n" not in str(info.value) and max_diff(before, trained(model)) == 0


def test_a_model_without_adapters_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs a lorakit-adapted model; call lorakit.adapt"):
        Trainer(
            model=tiny_llama(),
            args=arguments(tmp_path),
            train_dataset=token_data(),
            callbacks=[ProcedureCallback("flat")],
        )


@pytest.mark.parametrize("name", list(PROCEDURES))
def test_procedure_under_gradient_checkpointing_trains_as_without(name, tmp_path):
    """TRL's SFTTrainer checkpoints activations by default: the recomputed forward must not change a procedure."""
    variant, text, overrides = PROCEDURES[name]
    results, states = [], []
    for checkpointing in (False, True):
        model, callback = adapted(variant, **overrides), ProcedureCallback(text)
        base = frozen(model)
        train(
            model,
            tmp_path / str(checkpointing),
            max_steps=4,
            save_strategy="no",
            gradient_checkpointing=checkpointing,
            callbacks=[callback],
            **TRAINER_ARGS.get(name, {}),
        )
        assert model.is_gradient_checkpointing == checkpointing and max_diff(base, frozen(model)) == 0
        results.append(logits(model))
        states.append(_numbers(callback.procedure.state_dict()))  # e.g. IncreLoRA's importance scores
    assert torch.allclose(results[0], results[1], atol=1e-5, rtol=0)
    assert states[0] == pytest.approx(states[1], rel=1e-6, abs=1e-12)


def _numbers(value) -> list:
    """Every number in a JSON-like value, in order (a recomputed forward must not double-count anything)."""
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in _numbers(value[key])]
    if isinstance(value, list | tuple):
        return [x for item in value for x in _numbers(item)]
    return [float(value)] if isinstance(value, int | float) else []


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        (dict(fsdp=True), "procedure flat does not support FSDP (the weights are shards there); use DDP"),
        (dict(deepspeed="ds_config.json"), "procedure flat cannot run under DeepSpeed"),
    ],
)
def test_fsdp_and_deepspeed_are_refused_with_a_procedure(setting, words, tmp_path):
    """README (With Trainer / TRL): FSDP and DeepSpeed are not covered, and say so in one line before training. The
    callback is called as the Trainer calls it at the end of its __init__, with the Trainer's arguments: a Trainer
    itself refuses fsdp outside a distributed launch, and deepspeed is not installed here, so the DeepSpeed setting
    is set on the arguments after they are built."""
    model = adapted()
    before = trained(model)
    args = arguments(tmp_path, **{k: v for k, v in setting.items() if k == "fsdp"})
    if "deepspeed" in setting:
        object.__setattr__(args, "deepspeed", setting["deepspeed"])
    with pytest.raises(ConfigError) as info:
        ProcedureCallback("flat").on_init_end(args, None, None, model=model)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert max_diff(before, trained(model)) == 0


def test_sharded_adapter_tensors_are_refused_when_saving(tmp_path):
    """Under ZeRO-3 (or FSDP through the Trainer) a process holds an empty placeholder (or a DTensor) where a whole
    tensor was: save_model refuses in one line instead of writing an empty adapter."""
    model = adapted()
    layer = next(layer for _, layer in lorakit.adapter_layers(model))
    layer.A.data = torch.empty(0)  # what DeepSpeed ZeRO-3 leaves in a partitioned parameter
    with pytest.raises(ConfigError, match="the adapter's tensors are sharded") as info:
        model.save_pretrained(tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out" / "adapter.safetensors").exists()
