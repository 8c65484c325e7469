"""Training checkpoints without pickle: adapter (lorakit format), optimizer tensors (safetensors), and a JSON of
the step, scheduler, RNG and log position. The frozen base model is never written.

A checkpoint directory is filled under a temporary name and renamed into place, so `checkpoints/step-N` exists
only when complete; an interrupted save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import write_json
from ..errors import LorakitError
from ..persist import save_adapter

PREFIX = "step-"


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def save_checkpoint(out: Path, model, optimizer, scheduler, step: int, extra: dict, keep: int) -> Path:
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step}-", dir=root))
    try:
        save_adapter(model, tmp)
        tensors, groups = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {
            "step": step,
            "optimizer_param_groups": groups,
            "scheduler": scheduler.state_dict(),
            "python_random": _encode_python_random(random.getstate()),
            **extra,
        }
        write_json(tmp / "state.json", state)
        final = root / f"{PREFIX}{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG from `path` (the adapter is loaded by the caller); returns state.json."""
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, Exception) as exc:  # a damaged checkpoint must not crash with a traceback
        raise LorakitError(
            f"checkpoint {path} is unreadable ({str(exc)[:200]}); delete it to resume from an older one"
        ) from None
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer_param_groups"]))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    random.setstate(_decode_python_random(state["python_random"]))
    return state


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{key}"] = tensor.detach().to("cpu").contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": groups}


def _encode_python_random(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_python_random(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
