"""Several processes on CPU (torchrun, gloo): FSDP2 sharding, gathered saves, per-process dropout RNG, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import adapter_tensors, config, max_diff

import lorakit
from lorakit.models import load_model
from lorakit.training import train

PROCEDURE_NAMES = ("flat", "cola", "xgblora", "increlora")  # every registered one (asserted below)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorakit"]


def torchrun(cfg) -> None:
    subprocess.run(TORCHRUN + ["train", *cfg.to_argv()], check=True)


def summary_of(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def initial_adapter(model_dir, cfg) -> dict:
    model = lorakit.adapt(load_model(str(model_dir))[0], cfg.adapter_config())
    return {
        f"{name}.{key}": value.detach().clone()
        for name, layer in lorakit.adapter_layers(model)
        for key, value in layer.stored_tensors().items()
    }


VARIANTS = {
    "lora": dict(method="lora"),
    "olora": dict(method="olora"),  # factors the full weight: wrong under sharding unless adapted before it
    "mini-qr": dict(method="mini", mini_outer="qr", mini_a=8, mini_b=8, lr=5e-2),  # likewise
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp_two_processes_equal_one_with_double_batch(variant, tiny_model_dir, instruction_file, tmp_path):
    # full_logits: FSDP computes the loss from the whole logits (the fused loss needs the unsharded head), so the
    # single-process run does too; with the fused loss there the two differ by float32 rounding (2.1e-5 measured)
    settings = dict(steps=4, full_logits=True, **VARIANTS[variant])
    torchrun(config(tiny_model_dir, instruction_file, tmp_path / "fsdp", batch_size=2, fsdp=True, **settings))
    single_cfg = config(tiny_model_dir, instruction_file, tmp_path / "one", batch_size=4, **settings)
    train(single_cfg)
    single, sharded = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "fsdp")
    assert max_diff(sharded, initial_adapter(tiny_model_dir, single_cfg)) > 1e-3  # it really trained
    # same module names (no _fsdp_wrapped_module), full shapes, same values
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in single.items()}
    assert max_diff(single, sharded) <= 5e-6  # measured 1.26e-6 (lora), 9.1e-7 (olora), 1.8e-7 (mini-qr): 4x margin
    lorakit.load_adapter(load_model(str(tiny_model_dir))[0], tmp_path / "fsdp" / "adapter")  # strict base check
    summary = summary_of(tmp_path / "fsdp")
    assert summary["strategy"] == "fsdp" and summary["processes"] == 2
    assert len(summary["peak_memory_bytes_per_process"]) == 2 and min(summary["peak_memory_bytes_per_process"]) > 0
    total, held = summary["base_parameters"], summary["base_parameters_per_process"]
    assert len(held) == 2 and all(abs(h - total / 2) <= 0.01 * total for h in held), (total, held)
    assert summary_of(tmp_path / "one")["base_parameters_per_process"] == [total]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_with_dropout_equals_uninterrupted(strategy, tiny_model_dir, instruction_file, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"

    def cfg(out, **extra):
        return config(
            tiny_model_dir,
            instruction_file,
            out,
            steps=6,
            batch_size=2,
            dropout=0.1,
            save_every=2,
            keep_checkpoints=5,
            **({"fsdp": True} if strategy == "fsdp" else {}),
            **extra,
        )

    torchrun(cfg(whole))
    # the run as it stood after step 2: its checkpoint, without what came later
    shutil.copytree(whole, resumed)
    for later in ("adapter", "summary.json", "checkpoints/step-000004"):
        path = resumed / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    torchrun(cfg(resumed, resume=True))
    assert max_diff(adapter_tensors(whole), adapter_tensors(resumed)) == 0  # measured 0 (ddp, fsdp): bit-exact
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert summary_of(resumed)["strategy"] == strategy
    rng_states = load_file(str(whole / "checkpoints" / "step-000002" / "rng.safetensors"))
    assert set(rng_states) == {"rank0.torch", "rank1.torch"}  # every process's state, restored per process
    assert not rng_states["rank0.torch"].equal(rng_states["rank1.torch"])


def test_dropout_masks_differ_across_processes(tiny_model_dir, tmp_path):
    """With every example identical, both processes see the same batch: the averaged gradient of 2 processes ×
    batch B equals 1 process × batch B exactly, unless the processes draw different dropout masks."""
    record = {"instruction": "Summarise item 3", "input": "def add(a, b): return a + b", "output": "Return the sum."}
    data = tmp_path / "same.jsonl"
    data.write_text((json.dumps(record) + "\n") * 8)
    diffs = {}
    for dropout in (0.0, 0.1):
        settings = dict(steps=3, batch_size=2, dropout=dropout)
        torchrun(config(tiny_model_dir, data, tmp_path / f"two-{dropout}", **settings))
        train(config(tiny_model_dir, data, tmp_path / f"one-{dropout}", **settings))
        diffs[dropout] = max_diff(
            adapter_tensors(tmp_path / f"two-{dropout}"), adapter_tensors(tmp_path / f"one-{dropout}")
        )
    assert diffs[0.0] == 0, diffs  # measured 0: without dropout the two processes compute identical gradients
    assert diffs[0.1] > 1e-4, diffs  # with dropout process 1 masks differently from process 0


def test_fsdp_bf16_uses_mixed_precision(tiny_model_dir, instruction_file, tmp_path):
    torchrun(
        config(tiny_model_dir, instruction_file, tmp_path / "bf16", steps=4, batch_size=2, fsdp=True, precision="bf16")
    )
    train(config(tiny_model_dir, instruction_file, tmp_path / "fp32", steps=4, batch_size=4))
    bf16, fp32 = adapter_tensors(tmp_path / "bf16"), adapter_tensors(tmp_path / "fp32")
    assert 1e-4 < max_diff(bf16, fp32) < 0.1  # computed in bfloat16, not silently in float32; still the same training
    summary = summary_of(tmp_path / "bf16")
    assert summary["precision"]["mode"] == "bf16" and "MixedPrecisionPolicy" in summary["precision"]["how"]
    assert abs(summary["final_train_loss"] - summary_of(tmp_path / "fp32")["final_train_loss"]) < 0.05
    lorakit.load_adapter(load_model(str(tiny_model_dir))[0], tmp_path / "bf16" / "adapter")


def test_fsdp_needs_a_distributed_launch(tiny_model_dir, instruction_file, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(lorakit.ConfigError, match=r"--fsdp .*launch with torchrun --nproc_per_node N"):
        train(config(tiny_model_dir, instruction_file, tmp_path / "a", fsdp=True))
    with pytest.raises(lorakit.ConfigError, match="--precision fp16 is not supported with --fsdp"):
        train(config(tiny_model_dir, instruction_file, tmp_path / "b", fsdp=True, precision="fp16"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp: would not shard on CPU
    with pytest.raises(lorakit.ConfigError, match="accelerate launch --use_fsdp is not supported; pass --fsdp"):
        train(config(tiny_model_dir, instruction_file, tmp_path / "c"))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        *[(dict(procedure=name), f"--procedure {name} does not support --fsdp yet") for name in PROCEDURE_NAMES],
        (dict(optimizer="rite"), "--optimizer rite does not support --fsdp yet; use --optimizer adamw"),
    ],
)
def test_procedures_and_rite_are_refused_under_fsdp_in_one_line(
    overrides, words, tiny_model_dir, instruction_file, tmp_path
):
    """README: the four procedures and LoRA-RITE do not shard yet; --fsdp with one of them stops before any work."""
    from lorakit.procedures import PROCEDURES

    assert set(PROCEDURES) == set(PROCEDURE_NAMES)
    with pytest.raises(lorakit.ConfigError) as info:
        train(config(tiny_model_dir, instruction_file, tmp_path / "out", fsdp=True, **overrides))
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "machine, avx512_bf16, amx, precision, warned",
    [
        ("x86_64", False, False, "bf16", True),  # AVX2 only: emulated
        ("x86_64", True, False, "bf16", False),
        ("x86_64", False, True, "bf16", False),
        ("x86_64", False, False, "no", False),
        ("aarch64", False, False, "bf16", False),  # cannot tell: no warning
    ],
)
def test_bf16_on_a_cpu_that_emulates_it_warns(monkeypatch, machine, avx512_bf16, amx, precision, warned):
    import platform
    import warnings

    from lorakit.training import distributed

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime = distributed.make_runtime(precision, fsdp=False)
    runtime.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert messages == ([distributed.BF16_EMULATED] if warned else [])
    if warned:
        assert "use --precision no" in messages[0]
