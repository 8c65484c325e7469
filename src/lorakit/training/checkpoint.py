"""Training checkpoints without pickle: adapter (lorakit format), optimizer tensors (safetensors), the RNG state of
every process (safetensors), and a JSON of the step, scheduler, Python RNG states and log position. The frozen
base model is never written.

Under sharding (FSDP) the caller gathers the adapter and the optimizer state to full tensors first, so a checkpoint
has the same layout whatever wrote it; `load_checkpoint` re-shards the optimizer state like the parameters.

A checkpoint directory is filled under a temporary name and renamed into place, so `checkpoints/step-N` exists
only when complete; an interrupted save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import write_json
from ..errors import ConfigError, LorakitError
from ..persist import save_adapter
from . import rng as train_rng

PREFIX = "step-"
PROCEDURE_TENSORS = "procedure.safetensors"


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def save_checkpoint(
    out: Path,
    model,
    optimizer,
    scheduler,
    step: int,
    extra: dict,
    keep: int,
    *,
    rng_states: list[dict] | None = None,
    optimizer_state: dict | None = None,
    procedure_tensors: dict | None = None,
) -> Path:
    """Write checkpoint `step` of `model` (an unsharded view of the adapter) and return its directory.

    `rng_states`: `rng.capture()` of every process, in rank order (default: this process only).
    `optimizer_state`: a full (unsharded) optimizer state dict to write instead of `optimizer.state_dict()`.
    """
    rng_states = rng_states if rng_states is not None else [train_rng.capture()]
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".tmp-{PREFIX}*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step}-", dir=root))
    try:
        save_adapter(model, tmp)
        tensors, groups = _flatten_optimizer(optimizer_state if optimizer_state is not None else optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors = {}
        for rank, states in enumerate(rng_states):
            rng_tensors[f"rank{rank}.torch"] = states["torch"]
            rng_tensors.update({f"rank{rank}.cuda.{i}": s for i, s in enumerate(states.get("cuda", []))})
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        if procedure_tensors:  # a training procedure's tensors (Chain of LoRA's finished links)
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in procedure_tensors.items()}
            save_file(tensors, str(tmp / PROCEDURE_TENSORS))
        state = {
            "step": step,
            "processes": len(rng_states),
            "optimizer_param_groups": groups,
            "scheduler": scheduler.state_dict(),
            "python_random": [states["python"] for states in rng_states],
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


def load_checkpoint(path: Path, optimizer, scheduler, *, rank: int = 0, processes: int | None = None) -> dict:
    """Restore optimizer, scheduler and the RNG of process `rank` from `path`; returns state.json.

    The adapter is loaded by the caller. `processes`: the number of processes of this run; a checkpoint written by
    a different number is refused (the global batch and the per-process RNG streams depend on it).
    """
    try:
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
        procedure_file = path / PROCEDURE_TENSORS
        state["procedure_tensors"] = load_file(str(procedure_file)) if procedure_file.is_file() else {}
    except (OSError, ValueError, Exception) as exc:  # a damaged checkpoint must not crash with a traceback
        raise LorakitError(
            f"checkpoint {path} is unreadable ({str(exc)[:200]}); delete it to resume from an older one"
        ) from None
    saved = state.get("processes")  # absent in checkpoints that kept only one process's RNG state
    if processes is not None and saved is not None and saved != processes:
        raise ConfigError(
            f"--resume: checkpoint {path} was written by {saved} process(es) but this run has {processes}; "
            f"launch with {saved} process(es)"
        )
    state_dict = _unflatten_optimizer(tensors, state["optimizer_param_groups"])
    optimizer.load_state_dict(_shard_like_parameters(state_dict, optimizer))
    scheduler.load_state_dict(state["scheduler"])
    if saved is None:
        train_rng.restore(
            {
                "torch": rng["torch"],
                "cuda": [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=_index)],
                "python": state["python_random"],
            }
        )
    else:
        prefix = f"rank{rank}."
        train_rng.restore(
            {
                "torch": rng[prefix + "torch"],
                "cuda": [rng[k] for k in sorted((k for k in rng if k.startswith(prefix + "cuda.")), key=_index)],
                "python": state["python_random"][rank],
            }
        )
    return state


def _index(key: str) -> int:
    return int(key.rsplit(".", 1)[1])


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


def _shard_like_parameters(state_dict: dict, optimizer) -> dict:
    """Turn the full state tensors of sharded (DTensor) parameters into shards laid out like the parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(_is_dtensor(p) for p in params):
        return state_dict
    from torch.distributed.tensor import distribute_tensor

    for index, values in state_dict["state"].items():
        param = params[int(index)]
        if not _is_dtensor(param):
            continue
        for key, value in values.items():
            if value.shape == param.shape:  # moments of the parameter; `step` is a scalar and stays as it is
                # every process holds the full tensor: cut out the local shard without communication
                values[key] = distribute_tensor(
                    value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                )
    return state_dict


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)
