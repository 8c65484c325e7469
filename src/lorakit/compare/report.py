"""Aggregate a comparison's runs into results.json and report.md (mean ± std over seeds)."""

from __future__ import annotations

import math
import statistics

from .runner import final_loss


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def steps_to_target(outcome: dict, target: float) -> int | None:
    curve = outcome["eval_curve"] or _smoothed(outcome["train_curve"])
    return next((step for step, loss in curve if loss <= target), None)


def _smoothed(curve: list[list[float]], window: int = 5) -> list[list[float]]:
    out = []
    for i, (step, _) in enumerate(curve):
        chunk = [loss for _, loss in curve[max(0, i - window + 1) : i + 1]]
        out.append([step, sum(chunk) / len(chunk)])
    return out


def summarise(methods: dict, target: float | None) -> tuple[dict, float]:
    """Add per-method aggregates (and steps to the target loss) to `methods`; returns (methods, target used)."""
    if target is None:  # the loss every method reaches: the worst final mean loss
        finals = [mean_std([final_loss(r) for r in m["runs"].values()])[0] for m in methods.values()]
        finite = [f for f in finals if math.isfinite(f)]
        target = max(finite) if finite else math.nan
    for entry in methods.values():
        runs = list(entry["runs"].values())
        for run in runs:
            run["steps_to_target"] = steps_to_target(run, target) if math.isfinite(target) else None
        fields = {
            "final_eval_loss": [final_loss(r) for r in runs],
            "final_eval_perplexity": [math.exp(min(final_loss(r), 50)) for r in runs],
            "steps_to_target": [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None],
            "tokens_per_s": [r.get("tokens_per_s") for r in runs],
            "wall_time_s": [r.get("wall_time_s") for r in runs],
            "peak_memory_bytes": [r.get("peak_memory_bytes") for r in runs],
        }
        entry["mean"], entry["std"] = {}, {}
        for key, values in fields.items():
            entry["mean"][key], entry["std"][key] = mean_std(values)
        entry["diverged_runs"] = sum(1 for r in runs if r.get("diverged"))
        first = next((r for r in runs if not r.get("diverged")), {})
        entry["trainable_parameters"] = first.get("trainable_parameters")
        entry["adapter_bytes"] = first.get("adapter_bytes")
    return methods, target


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    return "—" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(results: dict) -> str:
    setting = results["setting"]
    lines = [
        f"# lorakit compare: {setting['model']} on {setting['data']}",
        "",
        f"{setting['steps']} steps, batch {setting['batch_size']} × {setting['grad_accum']} accumulation, "
        f"max length {setting['max_length']}, {setting['schedule']} schedule with {setting['warmup']} warm-up steps, "
        f"seeds {', '.join(map(str, results['seeds']))}; same data order and schedule for every method. "
        f"Loss = {'eval' if results['has_eval'] else 'train (mean of the last 10%)'} loss; "
        f"target loss for 'steps to target': {results['target_loss']:.3f}. Mean ± std over seeds.",
        "",
        "| method | lr | trainable params | adapter file | final loss | perplexity | steps to target | tokens/s | wall time | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, entry in results["methods"].items():
        mean, std = entry["mean"], entry["std"]
        lr = f"{entry['lr']:g}" + (" (swept)" if entry.get("lr_sweep") else "")
        diverged = f" ({entry['diverged_runs']} diverged)" if entry["diverged_runs"] else ""
        reached = len([r for r in entry["runs"].values() if r.get("steps_to_target") is not None])
        lines.append(
            f"| {label} | {lr} | {entry['trainable_parameters'] or 0:,} | {(entry['adapter_bytes'] or 0) / 1e6:.2f} MB | "
            f"{_fmt(mean['final_eval_loss'], std['final_eval_loss'])}{diverged} | {_fmt(mean['final_eval_perplexity'], std['final_eval_perplexity'], 2)} | "
            f"{_fmt(mean['steps_to_target'], std['steps_to_target'], 0)} ({reached}/{len(entry['runs'])}) | "
            f"{mean['tokens_per_s']:.0f} | {mean['wall_time_s']:.0f} s | {mean['peak_memory_bytes'] / 2**30:.2f} GiB |"
        )
    sweeps = {label: e["lr_sweep"] for label, e in results["methods"].items() if e.get("lr_sweep")}
    if sweeps:
        lines += ["", "Learning-rate sweep (final loss of a short run per rate, first seed):", ""]
        lines += [
            f"- {label}: " + ", ".join(f"lr {lr}: {loss:.3f}" for lr, loss in sweep.items())
            for label, sweep in sweeps.items()
        ]
    lines += ["", "![loss](loss.png)", "", "![params](params.png)", ""]
    return "\n".join(lines)
