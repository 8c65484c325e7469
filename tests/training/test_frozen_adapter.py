"""`lorakit train --frozen-adapter DIR`: a new adapter trains on top of frozen ones; `lorakit eval` of the stack."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import config, max_diff
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.data import load_examples
from lorakit.training import train
from lorakit.training.evaluate import evaluate_loss

LORAKIT = [sys.executable, "-m", "lorakit"]


@pytest.fixture(scope="module")
def stacked(tiny_model_dir, instruction_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    train(config(tiny_model_dir, instruction_file, root / "a", steps=4, targets="q_proj,v_proj", rank=2))
    frozen_bytes = (root / "a" / "adapter" / "adapter.safetensors").read_bytes()
    summary = train(
        config(
            tiny_model_dir, instruction_file, root / "b", steps=4, eval_data=str(instruction_file),
            frozen_adapter=[str(root / "a" / "adapter")], save_every=2,
        )
    )  # fmt: skip
    return root, summary, frozen_bytes


def _eval_loss(model_dir, data, *adapters) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    names = [f"s{i}" for i in range(len(adapters))]
    for name, path in zip(names, adapters, strict=True):
        model = lorakit.load_adapter(model, path, name=name)
    if len(names) > 1:
        lorakit.set_active(model, names)
    examples, _ = load_examples(str(data), tokenizer, 64)
    return evaluate_loss(model.eval(), examples, 4, tokenizer.pad_token_id or 0, torch.device("cpu"))["eval_loss"]


def test_the_new_adapter_trains_on_top_of_the_frozen_one(stacked, tiny_model_dir, instruction_file):
    root, summary, frozen_bytes = stacked
    a, b = root / "a" / "adapter", root / "b" / "adapter"
    assert (a / "adapter.safetensors").read_bytes() == frozen_bytes
    assert summary["frozen_adapters"] == [str(a.resolve())]
    # the saved adapter is the new one alone: every linear layer at rank 4, nothing of the frozen q/v rank-2 one
    meta = json.loads((b / "adapter.json").read_text())
    frozen_meta = json.loads((a / "adapter.json").read_text())
    assert meta["config"]["r"] == 4 and frozen_meta["config"]["r"] == 2
    assert len(meta["modules"]) > len(frozen_meta["modules"])
    assert summary["trainable_parameters"] == sum(t.numel() for t in load_file(str(b / "adapter.safetensors")).values())
    # the run's final eval is the stack's: the frozen adapter from its (unchanged) file plus the new one
    stack = _eval_loss(tiny_model_dir, instruction_file, a, b)
    assert summary["final_eval_loss"] == pytest.approx(stack, abs=1e-6)
    alone = _eval_loss(tiny_model_dir, instruction_file, b)
    assert abs(alone - stack) > 1e-3  # the frozen adapter took part: without it the loss differs


def test_eval_of_the_stack_on_the_command_line(stacked, tiny_model_dir, instruction_file):
    root, summary, _ = stacked
    result = subprocess.run(
        [*LORAKIT, "eval", "--model", tiny_model_dir, "--data", instruction_file, "--max-length", "64",
         "--batch-size", "4", "--exact-match", "0", "--adapter", root / "a" / "adapter", "--adapter",
         root / "b" / "adapter"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(result.stdout)["eval_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-6)


def test_resume_with_a_frozen_adapter_is_exact(stacked, tiny_model_dir, instruction_file, tmp_path):
    root, _, _ = stacked
    broken = shutil.copytree(root / "b", tmp_path / "b")
    shutil.rmtree(broken / "adapter")  # as if stopped after the step-2 checkpoint
    (broken / "summary.json").unlink()
    train(
        config(
            tiny_model_dir, instruction_file, broken, steps=4, eval_data=str(instruction_file),
            frozen_adapter=[str(root / "a" / "adapter")], save_every=2, resume=True,
        )
    )  # fmt: skip
    whole = load_file(str(root / "b" / "adapter" / "adapter.safetensors"))
    again = load_file(str(broken / "adapter" / "adapter.safetensors"))
    assert max_diff(whole, again) <= 1e-6


def test_what_does_not_combine_is_refused_before_anything_is_written(stacked, tiny_model_dir, instruction_file, tmp_path):
    root, _, _ = stacked
    frozen = [str(root / "a" / "adapter")]
    cases = {
        "does not combine with --procedure": dict(procedure="flat"),
        "does not combine with --optimizer rite": dict(optimizer="rite"),
        "does not combine with --add-tokens": dict(add_tokens="<x>"),
        "given twice": dict(frozen_adapter=frozen * 2),
    }
    for i, (message, overrides) in enumerate(cases.items()):
        out = tmp_path / f"r{i}"
        cfg = config(tiny_model_dir, instruction_file, out, **{"frozen_adapter": frozen, **overrides})
        with pytest.raises(lorakit.ConfigError, match=message):
            train(cfg)
        assert not out.exists()


def test_a_frozen_adapter_of_another_base_is_refused(stacked, instruction_file, tmp_path):
    from tiny_assets import build_model_dir

    root, _, _ = stacked
    other = build_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(lorakit.BaseModelMismatchError):
        train(config(other, instruction_file, tmp_path / "r", frozen_adapter=[str(root / "a" / "adapter")]))
    assert not (tmp_path / "r").exists()
