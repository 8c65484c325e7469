"""Checkpoints: pickle-free round trip of optimizer / scheduler / RNG (every process's), and kill -9 mid-save."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_during_write
from transformers import get_scheduler

import lorakit
from lorakit import ConfigError
from lorakit.training import rng
from lorakit.training.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from lorakit.training.rng import process_seed

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


def test_every_process_rng_state_is_saved_and_restored_per_process(tmp_path):
    model, optimizer, scheduler = _setup()
    states, expected = [], []
    for rank in (0, 1):  # what two processes would hand to process 0
        rng.seed_process(0, rank)
        states.append(rng.capture())
        expected.append((torch.rand(4), random.random()))
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, 1, {}, keep=2, rng_states=states)
    for rank in (1, 0):
        torch.manual_seed(123)
        random.seed(123)
        _, optimizer2, scheduler2 = _setup()
        assert load_checkpoint(path, optimizer2, scheduler2, rank=rank, processes=2)["processes"] == 2
        values = (torch.rand(4), random.random())
        assert torch.equal(values[0], expected[rank][0]) and values[1] == expected[rank][1]
    assert not torch.equal(expected[0][0], expected[1][0])  # the processes' streams differ
    with pytest.raises(ConfigError, match="written by 2 process\\(es\\) but this run has 1; launch with 2"):
        load_checkpoint(path, *_setup()[1:], rank=0, processes=1)


def test_process_seeds_are_distinct_per_rank_and_reproducible():
    seeds = {process_seed(seed, rank) for seed in range(3) for rank in range(8)}
    assert len(seeds) == 24 and all(0 <= s < 2**63 for s in seeds)
    assert process_seed(5, 1) == process_seed(5, 1)
