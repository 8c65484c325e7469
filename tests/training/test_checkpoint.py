"""Checkpoints: pickle-free round trip of optimizer / scheduler / RNG, and kill -9 in the middle of a save."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import kill_during_write
from transformers import get_scheduler

import lorakit
from lorakit.training.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint

TESTS = Path(__file__).resolve().parents[1]


def _setup(seed=0):
    sys.path.insert(0, str(TESTS))
    from conftest import tiny_llama

    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    return model, optimizer, scheduler


def _train_steps(model, optimizer, scheduler, n):
    for _ in range(n):
        model(torch.randint(0, 64, (2, 8))).logits.square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_round_trip_restores_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = _setup()
    _train_steps(model, optimizer, scheduler, 3)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, 3, {"elapsed_s": 1.0}, keep=2)
    expected_rng = torch.rand(3)
    _, optimizer2, scheduler2 = _setup()
    state = load_checkpoint(path, optimizer2, scheduler2)
    assert state["step"] == 3 and scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(torch.rand(3), expected_rng)
    for key, value in optimizer.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(optimizer2.state_dict()["state"][key][name], tensor)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    model, optimizer, scheduler = _setup()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, optimizer, scheduler, step, {}, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000002", "step-000003"]


def test_kill_during_checkpoint_save_keeps_previous_checkpoint(tmp_path):
    model, optimizer, scheduler = _setup()
    save_checkpoint(tmp_path, model, optimizer, scheduler, 1, {}, keep=2)
    kill_during_write(f"""
        from pathlib import Path
        from test_checkpoint import _setup, _train_steps
        from lorakit.training.checkpoint import save_checkpoint
        model, optimizer, scheduler = _setup()
        _train_steps(model, optimizer, scheduler, 2)
        save_checkpoint(Path({str(tmp_path)!r}), model, optimizer, scheduler, 2, {{}}, keep=2)
    """)
    (only,) = checkpoint_dirs(tmp_path)
    assert only.name == "step-000001"
    _, optimizer2, scheduler2 = _setup()
    assert load_checkpoint(only, optimizer2, scheduler2)["step"] == 1
    assert lorakit.read_adapter(only)[1].method == "lora"
    save_checkpoint(tmp_path, *_setup(), 3, {}, keep=2)  # the next save cleans up what the killed one left
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000003"]
