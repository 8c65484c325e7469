"""Every training procedure and optimizer inside `lorakit train`: resume, DDP, and `lorakit eval` of the result."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.models import load_model
from lorakit.training import TrainConfig, train

# variant -> TrainConfig settings
VARIANTS = {
    "flat": dict(procedure="flat:rho=0.5"),  # a large ρ so that the noise visibly matters on a tiny model
    "cola": dict(procedure="cola:links=3"),  # knots after steps 2 and 4: the resume starts right after one
    "cola-rewarm-mini": dict(procedure="cola:links=2,schedule=rewarm,rewarm_steps=2", method="mini", mini_a=8, mini_b=8),
    "increlora": dict(procedure="increlora:target_rank=2,warmup=0,interval=1,top_h=5,rewarm_steps=2"),  # grows at 1-3
    "rite": dict(optimizer="rite"),  # LoRA-RITE instead of AdamW (lorakit.optim)
    "xgblora": dict(procedure="xgblora:rounds=3,layers=1,lam=0.01", rank=2),  # rounds start at steps 2, 4 (resume at 2)
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit"]


def config(model_dir, data, out, **overrides):
    values = dict(
        model=str(model_dir),
        data=str(data),
        eval_data=str(data),
        out=str(out),
        steps=6,
        batch_size=4,
        lr=1e-2,
        rank=4,
        max_length=64,
        quiet=True,
        save_every=2,
        keep_checkpoints=5,
    )
    values.update(overrides)
    return TrainConfig(**values)


def adapter_of(out) -> dict:
    return load_file(str(Path(out) / "adapter" / "adapter.safetensors"))


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_eval_and_effect(variant, tiny_model_dir, instruction_file, tmp_path, capsys):
    whole, resumed, plain = tmp_path / "whole", tmp_path / "resumed", tmp_path / "plain"
    summary = train(config(tiny_model_dir, instruction_file, whole, **VARIANTS[variant]))
    assert summary["procedure"] or summary["optimizer"] != "adamw"
    report = summary["procedure_report"] or {}
    if variant == "increlora":  # the saved total rank never exceeds the budget; the reserves trained beyond it
        assert report["total_rank"] <= report["budget"] and report["trained_parameters"] > report["saved_parameters"]
    if variant == "xgblora":
        assert len(report["trainable_per_round"]) == 3 and min(report["trainable_per_round"]) > 0
    # it changes training: not the same adapter as plain LoRA + AdamW
    plain_summary = train(config(tiny_model_dir, instruction_file, plain))
    assert abs(plain_summary["final_eval_loss"] - summary["final_eval_loss"]) > 1e-5
    # resume from the step-2 checkpoint as if the run had been killed there
    shutil.copytree(whole, resumed)
    for later in ("adapter", "summary.json", "checkpoints/step-000004"):
        path = resumed / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    train(config(tiny_model_dir, instruction_file, resumed, resume=True, **VARIANTS[variant]))
    assert max_diff(adapter_of(whole), adapter_of(resumed)) <= 1e-6
    # the final adapter loads onto the ORIGINAL base (strict) and `lorakit eval` gives the run's final eval loss
    lorakit.load_adapter(load_model(str(tiny_model_dir))[0], whole / "adapter")
    code = main(
        ["eval", "--model", str(tiny_model_dir), "--adapter", str(whole / "adapter"), "--data", str(instruction_file)]
        + ["--max-length", "64"]
    )
    assert code == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(evaluated["eval_loss"] - summary["final_eval_loss"]) <= 1e-4, (evaluated, summary["final_eval_loss"])


@pytest.mark.parametrize("method", ["olora", "loraxs"])
@pytest.mark.parametrize("procedure", ["cola:links=3", "xgblora:rounds=3,layers=2,lam=0.01"])
def test_resume_rederives_the_init_of_a_link_on_the_merged_weight(procedure, method, tiny_model_dir, instruction_file,
                                                                   tmp_path):
    """OLoRA's (A0, B0) and LoRA-XS's SVD of a link after the first come from W + ΣΔW (the links so far), which the
    checkpoint's adapter file alone cannot give: the resumed run (from the step-2 checkpoint, right after a knot /
    round end; every block trains in every XGBLoRA round) rederives them from its links, bit for bit."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    settings = dict(procedure=procedure, method=method, steps=6, eval_every=0)
    train(config(tiny_model_dir, instruction_file, whole, **settings))
    shutil.copytree(whole, resumed)
    for later in ("adapter", "summary.json", "checkpoints/step-000004", "checkpoints/step-000006"):
        path = resumed / later
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    train(config(tiny_model_dir, instruction_file, resumed, resume=True, **settings))
    assert max_diff(adapter_of(whole), adapter_of(resumed)) == 0  # measured: 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_equal_one_with_double_batch(variant, tiny_model_dir, instruction_file, tmp_path):
    settings = dict(steps=4, save_every=0, **VARIANTS[variant])
    two = config(tiny_model_dir, instruction_file, tmp_path / "two", batch_size=2, **settings)
    subprocess.run(TORCHRUN + ["train", *two.to_argv()], check=True)
    if variant == "rite":
        # RITE's pseudo-inverse of the near-zero R_B amplifies rounding: one batch of 4 and 2 micro-batches of 2
        # (the same sum, added in another order) already differ by 1.5e-4 in one process. Two processes add their
        # halves like 2 micro-batches do, so that is the run they must equal.
        settings["grad_accum"] = 2
    train(config(tiny_model_dir, instruction_file, tmp_path / "one", batch_size=2 if variant == "rite" else 4, **settings))
    assert max_diff(adapter_of(tmp_path / "one"), adapter_of(tmp_path / "two")) <= 1e-6  # measured <= 1.2e-7 (rite 0): 8x margin
