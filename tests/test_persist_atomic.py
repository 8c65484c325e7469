"""A save over an existing adapter is atomic as a pair of files: killed (-9) or failing (ENOSPC) at every fsync and
every rename in turn, the directory holds the complete previous adapter or the complete new one."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import fresh_copy, model_output, perturb_adapters, tiny_llama

import lorakit
from lorakit import atomic

TESTS = Path(__file__).resolve().parent


def adapter(seed: int):
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(method="lora", r=4, alpha=8))
    perturb_adapters(model, seed=seed)
    return model


def outputs(path: Path, inputs) -> torch.Tensor:
    return model_output(lorakit.load_adapter(tiny_llama(), path), inputs)


def is_previous_or_new(path: Path, inputs, previous, new) -> str:
    got = outputs(path, inputs)
    if torch.equal(got, previous):
        return "previous"
    if torch.equal(got, new):
        return "new"
    raise AssertionError("the directory holds neither the previous nor the new adapter")


STALL_AT_CALL = """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama, perturb_adapters
    import lorakit
    target = {point}
    calls = [0]
    def stalling(real, kind):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == target:
                print(f"point {{kind}}", flush=True)
                time.sleep(60)
            return real(*args, **kwargs)
        return wrapper
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(method="lora", r=4, alpha=8))
    perturb_adapters(model, seed=2)
    os.fsync = stalling(os.fsync, "fsync")
    os.replace = stalling(os.replace, "rename")
    os.rename = stalling(os.rename, "rename")
    lorakit.save_adapter(model, {path!r})
    print("done", flush=True)
"""


def test_kill_at_every_fsync_and_rename_leaves_previous_or_new(tmp_path, inputs):
    previous_model, new_model = adapter(seed=1), adapter(seed=2)
    previous, new = model_output(previous_model, inputs), model_output(new_model, inputs)
    seen, point = [], 0
    while True:
        point += 1
        path = tmp_path / f"point-{point}"
        lorakit.save_adapter(previous_model, path)
        script = textwrap.dedent(STALL_AT_CALL.format(tests=str(TESTS), point=point, path=str(path)))
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline().strip()
        if line == "done":
            proc.wait()
            assert is_previous_or_new(path, inputs, previous, new) == "new"
            break
        assert line.startswith("point "), line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        seen.append((line.split()[1], is_previous_or_new(path, inputs, previous, new)))
        assert point < 30, "the save never finished"
    kinds = [kind for kind, _ in seen]
    assert kinds.count("fsync") >= 2 and kinds.count("rename") >= 3, seen  # two files, one extra rename
    states = [state for _, state in seen]
    assert states[0] == "previous" and states[-1] == "new", seen  # the switch happens inside the save
    assert states == sorted(states, key=["previous", "new"].index), seen  # and never back


def count_calls(operation, save, monkeypatch) -> int:
    real, calls = getattr(os, operation), [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(atomic.os, operation, counting)
    save()
    monkeypatch.setattr(atomic.os, operation, real)
    return calls[0]


@pytest.mark.parametrize("operation", ["fsync", "replace"])
def test_an_error_at_every_fsync_and_rename_leaves_previous_or_new(operation, tmp_path, monkeypatch, inputs):
    previous_model, new_model = adapter(seed=1), adapter(seed=2)
    previous, new = model_output(previous_model, inputs), model_output(new_model, inputs)
    lorakit.save_adapter(previous_model, tmp_path / "count")
    total = count_calls(operation, lambda: lorakit.save_adapter(new_model, tmp_path / "count"), monkeypatch)
    assert total >= 3
    real = getattr(os, operation)
    states = []
    for point in range(1, total + 1):
        path = tmp_path / f"{operation}-{point}"
        lorakit.save_adapter(previous_model, path)
        calls = [0]

        def failing(*args, _point=point, _calls=calls, **kwargs):
            _calls[0] += 1
            if _calls[0] == _point:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        monkeypatch.setattr(atomic.os, operation, failing)
        try:
            lorakit.save_adapter(new_model, path)
        except lorakit.LorakitError as exc:
            assert "No space left on device" in str(exc)
        monkeypatch.setattr(atomic.os, operation, real)
        states.append(is_previous_or_new(path, inputs, previous, new))
        # a later save over the same directory succeeds and leaves only the two files
        lorakit.save_adapter(fresh_copy(new_model), path)
        assert is_previous_or_new(path, inputs, previous, new) == "new"
        assert sorted(p.name for p in path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert "previous" in states, states  # the failures before the commit point keep the previous adapter
