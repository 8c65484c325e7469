"""Training runs on a tiny model: outputs, loss falls, resume after kill -9, DDP equality, NaN stop, TensorBoard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.training import TrainConfig, TrainingDiverged, train

LORAKIT = [sys.executable, "-m", "lorakit"]


def config(model_dir, data, out, **overrides):
    values = dict(
        model=str(model_dir),
        data=str(data),
        out=str(out),
        steps=6,
        batch_size=4,
        lr=1e-2,
        rank=4,
        max_length=64,
        quiet=True,
    )
    values.update(overrides)
    return TrainConfig(**values)


def adapter_tensors(out):
    return load_file(str(Path(out) / "adapter" / "adapter.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("method", ["lora", "olora", "mini"])
def test_train_writes_adapter_log_summary_and_loss_falls(method, tiny_model_dir, instruction_file, tmp_path):
    out = tmp_path / "run"
    summary = train(
        config(
            tiny_model_dir,
            instruction_file,
            out,
            method=method,
            steps=25,
            **(dict(mini_a=8, mini_b=8) if method == "mini" else {}),
            eval_data=str(instruction_file),
            eval_every=5,
            lr=1e-1 if method == "mini" else 1e-2,
        )
    )
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(0, 26))  # step 0: the eval before training
    assert "loss" not in lines[0] and "eval_loss" in lines[0]
    initial, lines = lines[0]["eval_loss"], lines[1:]
    assert all({"loss", "lr", "tokens_per_s"} <= l.keys() for l in lines)
    evals = [l["eval_loss"] for l in lines if "eval_loss" in l]
    assert len(evals) == 5 and evals == sorted(evals, reverse=True) and evals[-1] < initial - 0.05, (initial, evals)
    assert summary["final_eval_loss"] == evals[-1] and summary["adapter_bytes"] > 0
    assert json.loads((out / "run.json").read_text())["data_format"] == "instruction"
    metadata, adapter_config, _ = lorakit.read_adapter(out / "adapter")
    assert adapter_config.method == method


def test_resume_after_kill_gives_the_same_adapter(tiny_model_dir, instruction_file, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"

    def argv(out, **extra):
        return [
            "train",
            *config(
                tiny_model_dir, instruction_file, out, steps=60, dropout=0.1, save_every=5, grad_accum=2, **extra
            ).to_argv(),
        ]

    subprocess.run(LORAKIT + argv(whole), check=True)
    proc = subprocess.Popen(LORAKIT + argv(broken))
    deadline = time.time() + 120
    while time.time() < deadline and not (broken / "checkpoints" / "step-000015").exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (broken / "adapter").exists(), "the run finished before it was killed; the test proved nothing"
    subprocess.run(LORAKIT + argv(broken, resume=True), check=True)
    assert max_diff(adapter_tensors(whole), adapter_tensors(broken)) <= 1e-6
    steps = [json.loads(l)["step"] for l in (broken / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))


# README, Multi-process: both commands start the same DDP run. `accelerate launch` adds --multi_gpu by itself only
# where it sees several GPUs; without it on CPU it silently starts one process, hence the flag here and in README.
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "-m",
    "lorakit",
]
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit"],
    "accelerate": ACCELERATE,
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_processes_equal_one_with_double_batch(launcher, tiny_model_dir, instruction_file, tmp_path):
    def argv(out, batch_size):
        return ["train", *config(tiny_model_dir, instruction_file, out, steps=4, batch_size=batch_size).to_argv()]

    subprocess.run(LAUNCHERS[launcher] + argv(tmp_path / "ddp", 2), check=True)
    subprocess.run(LORAKIT + argv(tmp_path / "one", 4), check=True)
    single, ddp = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "ddp")
    assert max(b.abs().max().item() for k, b in single.items() if k.endswith(".B")) > 1e-2  # it really trained
    assert max_diff(single, ddp) <= 1e-4
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("ddp", "one")}
    assert summaries["ddp"]["processes"] == 2 and summaries["ddp"]["strategy"] == "ddp"
    assert summaries["one"]["processes"] == 1 and summaries["one"]["strategy"] == "single"
    assert len(summaries["ddp"]["peak_memory_bytes_per_process"]) == 2
    assert len(summaries["one"]["peak_memory_bytes_per_process"]) == 1
    total = summaries["ddp"]["base_parameters"]
    assert summaries["ddp"]["base_parameters_per_process"] == [total, total]  # DDP: every process holds all


def test_grad_accumulation_equals_a_bigger_batch(tiny_model_dir, instruction_file, tmp_path):
    train(config(tiny_model_dir, instruction_file, tmp_path / "big", batch_size=4))
    train(config(tiny_model_dir, instruction_file, tmp_path / "acc", batch_size=2, grad_accum=2))
    assert max_diff(adapter_tensors(tmp_path / "big"), adapter_tensors(tmp_path / "acc")) <= 1e-5


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, instruction_file, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(
        TrainingDiverged,
        match=r"non-finite loss \(nan\) at step \d+; training stopped, the last good checkpoint is .*step-0000\d\d",
    ):
        train(config(tiny_model_dir, instruction_file, out, lr=1e30, steps=20, save_every=1))
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints and all(p.startswith("step-") for p in checkpoints)
    good = lorakit.read_adapter(out / "checkpoints" / checkpoints[-1])[2]
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (out / "adapter").exists()


def test_out_with_a_previous_run_needs_resume(tiny_model_dir, instruction_file, tmp_path):
    train(config(tiny_model_dir, instruction_file, tmp_path / "r", steps=2))
    with pytest.raises(lorakit.ConfigError, match="already holds a run; pass --resume"):
        train(config(tiny_model_dir, instruction_file, tmp_path / "r", steps=2))
    with pytest.raises(lorakit.ConfigError, match="no checkpoint"):
        train(config(tiny_model_dir, instruction_file, tmp_path / "r", steps=2, resume=True))


def test_resume_with_changed_settings_is_refused(tiny_model_dir, instruction_file, tmp_path):
    train(config(tiny_model_dir, instruction_file, tmp_path / "r", steps=4, save_every=2))
    shutil.rmtree(tmp_path / "r" / "adapter")
    with pytest.raises(lorakit.ConfigError, match="--lr differs"):
        train(config(tiny_model_dir, instruction_file, tmp_path / "r", steps=4, save_every=2, lr=0.5, resume=True))


def test_tensorboard_logs(tiny_model_dir, instruction_file, tmp_path):
    pytest.importorskip("tensorboard")
    train(config(tiny_model_dir, instruction_file, tmp_path / "tb", steps=2, report_to="tensorboard"))
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoints_hold_no_base_weights(tiny_model_dir, instruction_file, tmp_path):
    train(config(tiny_model_dir, instruction_file, tmp_path / "c", steps=4, save_every=2))
    (checkpoint,) = list((tmp_path / "c" / "checkpoints").iterdir())
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == ["adapter.json", "adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    stored = sum(p.stat().st_size for p in checkpoint.iterdir())
    assert stored < (tiny_model_dir / "model.safetensors").stat().st_size


def test_bf16_autocast_trains_float32_adapters_close_to_float32(tiny_model_dir, instruction_file, tmp_path):
    """`--precision bf16` without --fsdp: Accelerate's autocast computes the matmuls in bf16 (so the losses differ
    from float32's, by little) while the adapter, the optimizer state and the saved file stay float32."""
    full = train(config(tiny_model_dir, instruction_file, tmp_path / "fp32", steps=4))
    mixed = train(config(tiny_model_dir, instruction_file, tmp_path / "bf16", steps=4, precision="bf16"))
    assert mixed["precision"] == {"mode": "bf16", "how": "Accelerate autocast"}
    assert 0 < abs(mixed["final_train_loss"] - full["final_train_loss"]) < 0.05
    tensors = adapter_tensors(tmp_path / "bf16")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert max_diff(tensors, adapter_tensors(tmp_path / "fp32")) > 0
    lorakit.load_adapter(lorakit.models.load_model(str(tiny_model_dir))[0], tmp_path / "bf16" / "adapter")


def test_a_trainer_after_a_bf16_run_in_the_same_process_is_not_refused(tiny_model_dir, instruction_file, tmp_path):
    """Accelerate's process-wide state: a bf16 run must not leave it set for the next Accelerator (a float32
    Trainer would raise "AcceleratorState has already been initialized ... restart your runtime")."""
    from accelerate import Accelerator

    train(config(tiny_model_dir, instruction_file, tmp_path / "bf16", steps=2, precision="bf16"))
    assert Accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"
    train(config(tiny_model_dir, instruction_file, tmp_path / "bf16-again", steps=2, precision="bf16"))
