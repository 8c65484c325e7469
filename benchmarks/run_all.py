"""`make bench`: every benchmark, written to benchmarks/results.json and benchmarks/results.md."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_inference  # noqa: E402
import bench_loraxs_init  # noqa: E402
import bench_methods  # noqa: E402
import bench_multi_adapter  # noqa: E402
import bench_olora_init  # noqa: E402
import bench_procedures  # noqa: E402
import bench_rite  # noqa: E402
import bench_train_step  # noqa: E402
from common import machine  # noqa: E402

TARGETS = [
    ("OLoRA init, 2 big layers: speed-up over PEFT", ("olora_init_layers", "speedup"), ">=", 80),
    ("OLoRA init, 2 big layers: max relative error vs PEFT", ("olora_init_layers", "max_relative_error"), "<=", 1e-5),
    ("OLoRA init, SmolLM2: lorakit OLoRA / lorakit LoRA", ("olora_init_model", "olora_over_lora"), "<=", 1.2),
    ("train step: lorakit LoRA / PEFT LoRA", ("train_step", "lorakit_lora_over_peft_lora"), "<=", 1.0),
    ("train step: lorakit LoRA / bare floor", ("train_step", "lorakit_lora_over_bare"), "<=", 1.10),
    ("train step: lorakit Mini / lorakit LoRA", ("train_step", "lorakit_mini_over_lorakit_lora"), "<=", 1.05),
    ("peak RSS: lorakit LoRA / PEFT LoRA", ("peak_memory", "lorakit_lora_over_peft_lora"), "<=", 1.0),
    ("inference: merged / base", ("inference", "merged_over_base"), "<=", 1.02),
    ("adapter file: LoRA / Mini", ("adapter_files", "lora_over_mini"), ">=", 10),
]


def main() -> None:
    started = time.time()
    results = {"machine": machine()}
    steps = [
        ("olora_init_layers", lambda: bench_olora_init.layers(repeats=5)),
        ("olora_init_model", lambda: bench_olora_init.whole_model(repeats=5)),
        ("train_step", lambda: bench_train_step.step_times(repeats=5)),
        ("peak_memory", bench_train_step.peak_memory),
        ("inference", lambda: bench_inference.forward_times(repeats=11)),
        ("adapter_files", bench_inference.adapter_bytes),
        ("methods", lambda: bench_methods.run(repeats=9)),
        ("loraxs_init", bench_loraxs_init.run),
        ("rite", lambda: bench_rite.run(quick=False)),
        ("procedures", lambda: bench_procedures.run(repeats=7)),
        ("multi_adapter", lambda: bench_multi_adapter.run(rounds=5)),
    ]
    for name, fn in steps:
        print(f"[bench] {name} ...", flush=True)
        results[name] = fn()
        print(f"[bench] {name}: {json.dumps(results[name])}", flush=True)
    # scripts that measure in child processes of their own, each writing its results file (see their docstrings)
    for script in ("bench_memory.py", "bench_base_check.py"):
        print(f"[bench] {script} ...", flush=True)
        subprocess.run([sys.executable, str(HERE / script)], check=True)
    results["total_s"] = time.time() - started
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"# Benchmarks ({m['date']})",
        "",
        f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}, lorakit {m['lorakit']}. fp32 on CPU. "
        "Each figure is the median of >= 5 timed repetitions after warm-up; ratios are medians of per-pair ratios "
        f"from interleaved runs. Total {results['total_s'] / 60:.1f} min.",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for label, (section, key), op, goal in TARGETS:
        value = results[section][key]
        met = value >= goal if op == ">=" else value <= goal
        lines.append(f"| {label} | {value:.3g} | {op} {goal:g} | {'yes' if met else 'NO'} |")
    if "methods" in results:
        lines += ["", "Every method on SmolLM2-135M, r=16 (train step against LoRA in the same run):", ""]
        lines.append(bench_methods.markdown(results["methods"]))
    if "loraxs_init" in results:
        lines += ["", "LoRA-XS init (top-r SVD at a principal angle <= 1e-4):", ""]
        lines.append(bench_loraxs_init.markdown(results["loraxs_init"]))
    if "procedures" in results:
        lines += ["", "Training procedures against plain LoRA + AdamW:", ""]
        lines.append(bench_procedures.markdown(results["procedures"]))
    if "multi_adapter" in results:
        lines += ["", "Several LoRA r=16 adapters on SmolLM2, a mixed batch against PEFT's adapter_names:", ""]
        lines.append(bench_multi_adapter.markdown(results["multi_adapter"]))
    lines += [
        "",
        "Raw figures (seconds, bytes):",
        "",
        "```json",
        json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
