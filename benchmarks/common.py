"""Shared helpers of the benchmark scripts: timing, machine description, the SmolLM2 model."""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def machine() -> dict:
    import peft
    import transformers

    import lorakit

    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lorakit": lorakit.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_rss() -> None:
    """Reset this process's resident-memory high-water mark (VmHWM; Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark since the last reset."""
    status = open("/proc/self/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


_BASE = {}


def smollm2():
    """A fresh copy of SmolLM2-135M-Instruct (loaded once per process, from lorakit's cache)."""
    if "model" not in _BASE:
        from lorakit.models import load_model

        _BASE["model"], _BASE["tokenizer"] = load_model("smollm2-135m")
    return copy.deepcopy(_BASE["model"]).train()
