"""transformers' Trainer, unchanged, on a lorakit-adapted model: save_model and every checkpoint are lorakit adapter
directories without the base, resume is exact and checked, best-model loading and gradient checkpointing work,
for every registered method."""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VARIANTS, make_config, tiny_llama
from trainer_helpers import (
    adapted,
    arguments,
    assert_no_base_stored,
    frozen,
    logits,
    max_diff,
    safetensors_keys,
    token_data,
    train,
    trained,
)
from transformers import Trainer, TrainerCallback

import lorakit
from lorakit import AdapterFileError, BaseModelMismatchError, ConfigError
from lorakit.integrations import RESUME_FILE, load_adapter_into, remove_trainer_hooks, trainer_hooks_installed


def _adapt_installs_hooks() -> bool:
    return trainer_hooks_installed(lorakit.adapt(tiny_llama(), make_config("lora")))


def test_adapt_installs_the_trainer_hooks():
    assert _adapt_installs_hooks()


def test_plain_adapt_then_unchanged_trainer_saves_an_adapter(tmp_path):
    model = lorakit.adapt(tiny_llama(), make_config("lora"))  # nothing else: the user's Trainer code as it is
    trainer = train(model, tmp_path / "run", max_steps=2)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter.json").is_file()
    assert_no_base_stored(tmp_path / "final", model)
    assert torch.equal(logits(lorakit.load_adapter(tiny_llama(), tmp_path / "final")), logits(model))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_model_writes_a_lorakit_adapter_for_every_method(variant, tmp_path):
    model = adapted(variant)
    start, base = trained(model), frozen(model)
    trainer = train(model, tmp_path / "run", max_steps=2, save_strategy="no")
    assert max_diff(start, trained(model)) > 0, "the adapter did not train"
    assert max_diff(base, frozen(model)) == 0, "the base changed"
    trainer.save_model(str(tmp_path / "final"))
    out = tmp_path / "final"
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["method"] == VARIANTS[variant]["method"]
    assert not (out / "config.json").exists()  # not a transformers model directory: no full copy of the model
    assert_no_base_stored(out, model)
    reloaded = lorakit.load_adapter(tiny_llama(), out)  # strict base check against the ORIGINAL base
    assert torch.equal(logits(reloaded), logits(model))


def test_every_checkpoint_is_an_adapter_of_its_step(tmp_path):
    snapshots = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots[state.global_step] = copy.deepcopy(model)

    model = adapted("olora")  # stores A0, B0 beside the trained A, B
    train(model, tmp_path / "run", max_steps=3, save_steps=1, callbacks=[Snapshot()])
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for checkpoint in checkpoints:
        step = int(checkpoint.name.split("-")[1])
        assert_no_base_stored(checkpoint, model)
        assert safetensors_keys(checkpoint / "adapter.safetensors") <= safetensors_keys(checkpoint / RESUME_FILE)
        reloaded = lorakit.load_adapter(tiny_llama(), checkpoint)
        assert torch.equal(logits(reloaded), logits(snapshots[step])), checkpoint.name
    assert not torch.equal(logits(snapshots[1]), logits(snapshots[3]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_from_checkpoint_is_exact(variant, tmp_path):
    whole = adapted(variant)
    train(whole, tmp_path / "whole", max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    train(
        adapted(variant),
        tmp_path / "cut",
        max_steps=4,
        save_steps=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    shutil.rmtree(tmp_path / "cut" / "checkpoint-4")  # as if killed after the step-2 checkpoint
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert_no_base_stored(checkpoint, whole)  # so the adapter must come back from the lorakit files
    resumed = adapted(variant)
    train(
        resumed,
        tmp_path / "cut",
        resume=True,
        max_steps=4,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    assert max_diff(trained(whole), trained(resumed)) == 0  # measured 0 for every variant: bit-exact, no margin


def test_resume_loads_the_checkpoints_adapter_into_the_layers(tmp_path):
    first = adapted("mini-orthonormal")
    train(first, tmp_path / "run", max_steps=2)
    at_two = trained(first)
    fresh = adapted("mini-orthonormal")
    assert max_diff(at_two, trained(fresh)) > 0
    train(fresh, tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-2"), max_steps=2)  # no step left
    assert max_diff(at_two, trained(fresh)) == 0


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (dict(alpha=16), ConfigError, "alpha=8 but the model is adapted with alpha=16"),
        (dict(seed=5), ConfigError, "seed=0"),  # LoRA-Mini's frozen outer matrices come from the seed
        (dict(targets=["q_proj", "v_proj"]), ConfigError, "other modules"),
        (dict(method="lora"), ConfigError, "method='mini'"),
        (dict(base_seed=1), BaseModelMismatchError, "different weights"),
    ],
)
def test_resume_refuses_another_adapter_or_base(change, error, words, tmp_path):
    train(adapted("mini-orthonormal"), tmp_path / "run", max_steps=2)
    base_seed = change.pop("base_seed", 0)
    variant = "lora" if change.pop("method", None) else "mini-orthonormal"
    model = adapted(variant, base_seed=base_seed, **change)
    before = trained(model)
    with pytest.raises(error) as info:
        train(model, tmp_path / "run", resume=True, max_steps=4)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert max_diff(before, trained(model)) == 0  # refused before anything was loaded


def test_a_damaged_resume_file_is_refused_in_one_line(tmp_path):
    train(adapted(), tmp_path / "run", max_steps=2)
    resume_file = tmp_path / "run" / "checkpoint-2" / RESUME_FILE
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(resume_file))
    tensors["lorakit_resume"] = tensors["lorakit_resume"][:-7]
    save_file(tensors, str(resume_file))
    with pytest.raises(AdapterFileError, match="unreadable lorakit header") as info:
        train(adapted(), tmp_path / "run", resume=True, max_steps=4)
    assert "\n" not in str(info.value)


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    model = adapted("lora")
    # "best" = the highest eval loss, i.e. an early checkpoint, so that loading it is visible
    args = arguments(
        tmp_path / "run",
        max_steps=3,
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_data(), eval_dataset=token_data(8, seed=1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3"), best
    assert torch.equal(logits(model), logits(lorakit.load_adapter(tiny_llama(), best)))
    assert not torch.equal(logits(model), logits(lorakit.load_adapter(tiny_llama(), tmp_path / "run/checkpoint-3")))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_checkpointing_trains_the_adapter_on_a_frozen_base(variant, tmp_path):
    plain, checkpointed = adapted(variant), adapted(variant)
    base = frozen(checkpointed)
    train(plain, tmp_path / "plain", max_steps=2, save_strategy="no")
    train(checkpointed, tmp_path / "gc", max_steps=2, save_strategy="no", gradient_checkpointing=True)
    assert checkpointed.is_gradient_checkpointing
    assert max_diff(base, frozen(checkpointed)) == 0
    assert max_diff(trained(adapted(variant)), trained(checkpointed)) > 0
    # recomputing the activations gives the same gradients: the same adapter as without checkpointing
    assert max_diff(trained(plain), trained(checkpointed)) <= 1e-5


def test_reentrant_gradient_checkpointing_trains_every_layer(tmp_path):
    plain, checkpointed = adapted("lora"), adapted("lora")
    train(plain, tmp_path / "plain", max_steps=2, save_strategy="no")
    train(
        checkpointed,
        tmp_path / "gc",
        max_steps=2,
        save_strategy="no",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    assert max_diff(trained(plain), trained(checkpointed)) <= 1e-5


def test_hooks_follow_deepcopy_and_leave_with_unload(tmp_path):
    model = adapted("lora")
    train(model, tmp_path / "run", max_steps=1, save_strategy="no")
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            next(p for p in twin.parameters() if p.requires_grad).add_(1.0)
        twin.save_pretrained(tmp_path / "twin")  # the copy saves ITS adapter, not the original's
        assert torch.equal(logits(lorakit.load_adapter(tiny_llama(), tmp_path / "twin")), logits(twin))
    lorakit.merge_and_unload(model)  # a plain model again: transformers' own save_pretrained
    model.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file() and not (tmp_path / "merged" / "adapter.json").exists()
    remove_trainer_hooks(twin)
    assert not trainer_hooks_installed(twin)


def test_save_pretrained_on_other_processes_writes_nothing(tmp_path):
    model = adapted("lora")
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ConfigError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_load_adapter_into_an_adapted_model(tmp_path):
    model = adapted("prolora")
    train(model, tmp_path / "run", max_steps=2)
    fresh = adapted("prolora")
    load_adapter_into(fresh, tmp_path / "run" / "checkpoint-2")
    assert torch.equal(logits(fresh), logits(model))
    with pytest.raises(ConfigError, match="r=4 but the model is adapted with r=2"):
        load_adapter_into(adapted("prolora", r=2), tmp_path / "run" / "checkpoint-2")
    with pytest.raises(BaseModelMismatchError):
        load_adapter_into(adapted("prolora", base_seed=3), tmp_path / "run" / "checkpoint-2")


def test_ddp_two_processes_save_once_and_resume_exactly(tmp_path):
    script = Path(__file__).with_name("ddp_trainer.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> None:  # a failing child shows its own error, not only torchrun's exit status
        done = subprocess.run([*torchrun, *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-4000:]

    run(str(tmp_path / "whole"), "4")
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for later in ("checkpoint-4", "final"):  # as if killed after the step-2 checkpoint
        shutil.rmtree(tmp_path / "cut" / later)
    assert_no_base_stored(tmp_path / "cut" / "checkpoint-2", adapted("lora"))
    run(str(tmp_path / "cut"), "4", "resume")
    whole = lorakit.load_adapter(tiny_llama(), tmp_path / "whole" / "final")
    resumed = lorakit.load_adapter(tiny_llama(), tmp_path / "cut" / "final")
    assert max_diff(trained(whole), trained(resumed)) == 0  # measured 0: bit-exact
    assert max_diff(trained(whole), trained(adapted("lora"))) > 0
