"""Aggregate a comparison's runs into results.json and report.md (mean ± std over seeds).

Only finished runs (status "ok" with a finite final loss) enter the aggregates; diverged and failed runs are
counted beside them ("3.302 ± 0.011 (2 of 3 seeds; 1 diverged)") and listed with their one-line error. A value
measured on one run is printed as is, never as "± 0.000". Aggregates that have no data are null in results.json,
so the file never holds NaN, inf or the exp(50) of a clamped perplexity.
"""

from __future__ import annotations

import math
import statistics

from .runner import final_loss

OUTCOMES = ("diverged", "failed", "pending")  # pending: not finished yet (a report written with --report-only)


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample std) of the finite values; std is None below two values, both are None without any."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None


def status(run: dict) -> str:
    """ok, diverged, failed or pending (results written before statuses existed only knew `diverged`)."""
    return run.get("status") or ("diverged" if run.get("diverged") else "ok")


def steps_to_target(outcome: dict, target: float) -> int | None:
    curve = outcome["eval_curve"] or _smoothed(outcome["train_curve"])
    return next((step for step, loss in curve if loss <= target), None)


def _smoothed(curve: list[list[float]], window: int = 5) -> list[list[float]]:
    """Trailing moving average: at the i-th point, the mean of the losses of points max(0, i-window+1) .. i."""
    out = []
    for i, (step, _) in enumerate(curve):
        chunk = [loss for _, loss in curve[max(0, i - window + 1) : i + 1]]
        out.append([step, sum(chunk) / len(chunk)])
    return out


# Training-loss convergence (issue 28 item 21: OLoRA claims faster *training* convergence; eval loss alone cannot
# judge that). Every run's per-step train loss (log.jsonl, kept in results.json as train_curve) is smoothed by a
# trailing moving average of TRAIN_WINDOW logged steps (fewer at the start); then per run:
# - train_loss_first: the mean raw train loss over its first TRAIN_WINDOW logged steps (how fast it starts);
# - train_loss_final: the last smoothed value, i.e. the mean raw train loss over its last TRAIN_WINDOW steps;
# - train_curve_area: the area under the smoothed curve (trapezoidal rule over the logged steps) divided by the steps
#   it spans, i.e. the curve's mean height in loss units: lower is a training loss that is lower over the whole run;
# - train_steps_to_target: the first logged step whose smoothed loss is <= the train target, which is the worst
#   method's mean train_loss_final (the level every method reaches on average by the end, as for the eval target).
# Every method sees the same batches in the same order for a seed, so these compare like with like.
TRAIN_WINDOW = 10
TRAIN_FIELDS = ("train_loss_first", "train_loss_final", "train_curve_area", "train_steps_to_target")


def train_convergence(curve: list[list[float]], window: int = TRAIN_WINDOW) -> dict:
    """train_loss_first, train_loss_final and train_curve_area of one run's train curve (None where it is empty)."""
    if not curve:
        return {"train_loss_first": None, "train_loss_final": None, "train_curve_area": None}
    smooth = _smoothed(curve, window)
    first = [loss for _, loss in curve[:window]]
    span = smooth[-1][0] - smooth[0][0]
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(smooth, smooth[1:]))
    return {
        "train_loss_first": sum(first) / len(first),
        "train_loss_final": smooth[-1][1],
        "train_curve_area": area / span if span > 0 else smooth[0][1],
    }


def train_steps_to_target(curve: list[list[float]], target: float, window: int = TRAIN_WINDOW) -> int | None:
    return next((step for step, loss in _smoothed(curve, window) if loss <= target), None)


def summarise_training(methods: dict, target: float | None = None) -> float | None:
    """Add the training-loss convergence of every finished run, and their mean/std per method, to `methods` (after
    `summarise`); returns the train target used (`target`, else the worst method's mean final smoothed train loss)."""
    for entry in methods.values():
        for run in entry["runs"].values():
            ok = run["status"] == "ok" and run.get("train_curve")
            run.update(train_convergence(run["train_curve"] if ok else []))
    if target is None:
        finals = [mean_std([r["train_loss_final"] for r in m["runs"].values()])[0] for m in methods.values()]
        finite = [f for f in finals if f is not None]
        target = max(finite) if finite else None
    for entry in methods.values():
        ok = [r for r in entry["runs"].values() if r["train_loss_final"] is not None]
        for run in entry["runs"].values():
            reachable = run["train_loss_final"] is not None and target is not None
            run["train_steps_to_target"] = train_steps_to_target(run["train_curve"], target) if reachable else None
        for key in TRAIN_FIELDS:
            values = [r[key] for r in ok if r[key] is not None]
            entry["mean"][key], entry["std"][key] = mean_std(values)
    return target


def _drop_non_finite(run: dict) -> None:
    """null for non-finite numbers of a run, and no non-finite points in its curves (results.json stays JSON)."""
    for key, value in run.items():
        if isinstance(value, float) and not math.isfinite(value):
            run[key] = None
    for key in ("train_curve", "eval_curve", "time_curve"):
        run[key] = [point for point in run.get(key) or [] if math.isfinite(point[1])]


def _perplexity(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 700 else None  # exp overflows a float above ~709


def summarise(methods: dict, target: float | None) -> tuple[dict, float | None]:
    """Add per-method aggregates (and steps to the target loss) to `methods`; returns (methods, target used)."""
    for entry in methods.values():
        for run in entry["runs"].values():
            run["status"] = status(run)
            if run["status"] == "ok" and final_loss(run) is None:  # finished, but with a non-finite loss
                run.update(status="diverged", error=run.get("error") or "non-finite final loss")
            run["diverged"] = run["status"] == "diverged"
            _drop_non_finite(run)
    if target is None:  # the loss every method reaches: the worst final mean loss
        finals = [mean_std([final_loss(r) for r in m["runs"].values()])[0] for m in methods.values()]
        finite = [f for f in finals if f is not None]
        target = max(finite) if finite else None
    for entry in methods.values():
        runs = list(entry["runs"].values())
        ok = [r for r in runs if r["status"] == "ok"]
        for run in runs:
            reachable = run["status"] == "ok" and target is not None
            run["steps_to_target"] = steps_to_target(run, target) if reachable else None
        losses = [final_loss(r) for r in ok]
        fields = {
            "final_eval_loss": losses,
            "final_eval_perplexity": [_perplexity(loss) for loss in losses],
            "steps_to_target": [r["steps_to_target"] for r in ok if r["steps_to_target"] is not None],
            "tokens_per_s": [r.get("tokens_per_s") for r in ok],
            "wall_time_s": [r.get("wall_time_s") for r in ok],
            "peak_memory_bytes": [r.get("peak_memory_bytes") for r in ok],
            "exact_match": [r.get("exact_match") for r in ok],
            "accuracy": [r.get("accuracy") for r in ok],  # --task classification
        }
        entry["mean"], entry["std"] = {}, {}
        for key, values in fields.items():
            entry["mean"][key], entry["std"][key] = mean_std(values)
        entry["finished_runs"] = len(ok)
        entry["diverged_runs"] = sum(1 for r in runs if r["status"] == "diverged")
        entry["failed_runs"] = sum(1 for r in runs if r["status"] == "failed")
        entry["pending_runs"] = sum(1 for r in runs if r["status"] == "pending")
        first = ok[0] if ok else {}
        entry["trainable_parameters"] = first.get("trainable_parameters")
        # the saved adapter's count (runner.adapter_parameters), or the trainable one when it could not be read
        entry["adapter_parameters"] = first.get("adapter_parameters") or first.get("trainable_parameters")
        entry["adapter_bytes"] = first.get("adapter_bytes")
    return methods, target


def _fmt(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _counted(entry: dict) -> str:
    """ " (2 of 3 seeds; 1 diverged)" when some runs did not finish, else ""."""
    total = len(entry["runs"])
    if entry["finished_runs"] == total:
        return ""
    parts = [f"{entry.get(f'{kind}_runs', 0)} {kind}" for kind in OUTCOMES if entry.get(f"{kind}_runs")]
    return f" ({entry['finished_runs']} of {total} seeds; {', '.join(parts)})"


def _scalar(value: float | None, form: str) -> str:
    return "—" if value is None else form.format(value)


def _rate(lr: float | None) -> str:
    return "pending" if lr is None else f"{lr:g}"


def _sweep_lines(results: dict) -> list[str]:
    """The learning-rate sweep: per method the grid, its extensions, the rate chosen and every short run's loss;
    a warning for each method whose best rate is still at an end of its grid after the last extension."""
    swept = {label: e for label, e in results["methods"].items() if e.get("lr_sweep")}
    if not swept:
        return []
    sweep = results.get("sweep") or {}
    steps = f"{sweep['steps']}-step" if sweep.get("steps") else "short"
    rule = (
        f"; a best rate at an end of its grid extends the grid ×{sweep.get('factor', 3):g} past that end, at most "
        f"{sweep['max_extensions']} times"
        if "max_extensions" in sweep
        else ""
    )
    lines = ["", f"Learning-rate sweep (final loss of a {steps} run per rate, first seed{rule}):", ""]
    warnings = []
    for label, entry in swept.items():
        losses = ", ".join(
            f"lr {lr}: {loss if isinstance(loss, str) else f'{loss:.3f}'}" for lr, loss in entry["lr_sweep"].items()
        )
        grid, extended = entry.get("lr_sweep_grid"), entry.get("lr_sweep_extended") or []
        parts = [f"chosen {_rate(entry['lr'])}"]
        if grid:
            parts.append(f"grid {', '.join(map(_rate, grid))}")
        if extended:
            parts.append(
                f"extended to {', '.join(map(_rate, extended))} ({len(extended)} extension{'s' * (len(extended) > 1)})"
            )
        lines.append(f"- {label}: {'; '.join(parts)} — {losses}")
        if entry.get("lr_sweep_pending"):
            continue
        if entry.get("lr_sweep_finished") is False:
            warnings.append(
                f"- **warning**: {label}: no rate of the sweep finished; the runs use the lowest rate tried "
                f"({_rate(entry['lr'])})"
            )
        elif entry.get("lr_at_sweep_edge"):
            end = "upper" if grid and entry["lr"] >= max([*grid, *extended]) else "lower"
            warnings.append(
                f"- **warning**: {label}: the best rate {_rate(entry['lr'])} is still at the {end} end of its sweep "
                f"after {len(extended)} extension{'s' * (len(extended) != 1)}; the optimum may lie beyond it "
                '(results.json: "lr_at_sweep_edge": true)'
            )
    if warnings:
        lines += ["", *warnings]
    return lines


def markdown(results: dict) -> str:
    setting = results["setting"]
    target = results["target_loss"]
    spread = "Mean ± std over seeds" if len(results["seeds"]) > 1 else "One seed: single-run values, no spread measured"
    exact = any(e["mean"].get("exact_match") is not None for e in results["methods"].values())
    accuracy = any(e["mean"].get("accuracy") is not None for e in results["methods"].values())
    lines = [
        f"# lorakit compare: {setting['model']} on {setting['data']}",
        "",
        f"{setting['steps']} steps, batch {setting['batch_size']} × {setting['grad_accum']} accumulation, "
        f"max length {setting['max_length']}, {setting['schedule']} schedule with {setting['warmup']} warm-up steps, "
        f"seeds {', '.join(map(str, results['seeds']))}; same data order and schedule for every method. "
        f"Loss = {'eval' if results['has_eval'] else 'train (mean of the last 10%)'} loss; "
        f"target loss for 'steps to target': {_scalar(target, '{:.3f}')}. {spread}; diverged and failed runs "
        "are left out of the statistics and counted beside them. Trainable params: trained at once; where the saved "
        "adapter holds a different number (a training procedure), it follows as 'adapter:', and the plots use it.",
        "",
        "| method | lr | trainable params | adapter file | final loss | perplexity | steps to target | tokens/s | wall time | peak memory |"
        + (" exact match |" if exact else "")
        + (" accuracy |" if accuracy else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if exact else "") + ("---|" if accuracy else ""),
    ]
    unfinished = []
    for label, entry in results["methods"].items():
        mean, std = entry["mean"], entry["std"]
        swept = " (swept, at edge)" if entry.get("lr_at_sweep_edge") else " (swept)"
        lr = _rate(entry["lr"]) + (swept if entry.get("lr_sweep") and entry["lr"] is not None else "")
        reached = len([r for r in entry["runs"].values() if r.get("steps_to_target") is not None])
        params = _scalar(entry["trainable_parameters"], "{:,}")
        if entry.get("adapter_parameters") not in (None, entry["trainable_parameters"]):
            params += f" (adapter: {entry['adapter_parameters']:,})"
        size = _scalar(entry["adapter_bytes"] and entry["adapter_bytes"] / 1e6, "{:.2f} MB")
        memory = _scalar(mean["peak_memory_bytes"] and mean["peak_memory_bytes"] / 2**30, "{:.2f} GiB")
        row = (
            f"| {label} | {lr} | {params} | {size} | "
            f"{_fmt(mean['final_eval_loss'], std['final_eval_loss'])}{_counted(entry)} | "
            f"{_fmt(mean['final_eval_perplexity'], std['final_eval_perplexity'], 2)} | "
            f"{_fmt(mean['steps_to_target'], std['steps_to_target'], 0)} ({reached}/{len(entry['runs'])}) | "
            f"{_scalar(mean['tokens_per_s'], '{:.0f}')} | {_scalar(mean['wall_time_s'], '{:.0f} s')} | {memory} |"
        )
        if exact:
            row += f" {_percent(mean.get('exact_match'), std.get('exact_match'))} |"
        if accuracy:
            row += f" {_percent(mean.get('accuracy'), std.get('accuracy'))} |"
        lines.append(row)
        unfinished += [
            f"- {label} seed {seed}: {run['status']}: {run.get('error') or 'no message'}"
            for seed, run in entry["runs"].items()
            if run["status"] != "ok"
        ]
    if exact:
        plan = results.get("exact_match") or {}
        lines += [
            "",
            f"Exact match: greedy answer equal to the reference on the first {plan.get('examples', '?')} examples of "
            f"{plan.get('data', 'the eval data')} (`lorakit eval --exact-match`).",
        ]
    missing = [
        f"- {label} seed {seed}: {run['exact_match_error']}"
        for label, entry in results["methods"].items()
        for seed, run in entry["runs"].items()
        if run.get("exact_match_error")
    ]
    if missing:
        lines += ["", "Exact match could not be measured for:", "", *missing]
    if unfinished:
        lines += ["", "Runs that did not finish (left out of the statistics):", "", *unfinished]
    lines += _training_lines(results)
    lines += _reused_lines(results)
    total = sum(len(entry["runs"]) for entry in results["methods"].values())
    waiting = sum(entry.get("pending_runs", 0) for entry in results["methods"].values())
    if waiting:  # --report-only while the comparison is still running
        lines[1:1] = [
            "",
            f"**Partial report**: {total - waiting} of {total} runs have finished; the other {waiting} are pending "
            "(this report was written with `--report-only` before they had run). Every figure below comes from the "
            "finished runs only.",
        ]
    if results.get("note"):  # --note: what a reader should know first (e.g. that some variants ran elsewhere)
        lines[1:1] = ["", results["note"]]
    lines += _sweep_lines(results)
    lines += ["", "![loss](loss.png)", "", "![params](params.png)", "", "![pareto](pareto.png)", ""]
    lines += ["![loss against wall time](loss_vs_time.png)", ""]
    return "\n".join(lines)


def _training_lines(results: dict) -> list[str]:
    """The training-loss convergence table beside the final eval loss (summarise_training; absent from results
    written before it existed)."""
    train = results.get("train_convergence")
    if not train:
        return []
    window, target = train["window"], train["target_loss"]
    final = "final eval loss" if results["has_eval"] else "final loss"
    lines = [
        "",
        f"Training-loss convergence, beside the {final}. Each run's per-step train loss is smoothed by a trailing "
        f"moving average over {window} logged steps (fewer at the start). First {window} steps: the mean train loss "
        f"over the first {window} logged steps. Final: the last smoothed value (the mean over the last {window} "
        "steps). Area: the area under the smoothed curve (trapezoidal, over the logged steps) divided by the steps it "
        "spans, i.e. its mean height, lower for a training loss that is lower over the whole run. Steps to train "
        f"target: the first step whose smoothed train loss is at most {_scalar(target, '{:.3f}')}, the worst "
        "method's mean final train loss. Mean ± std over seeds.",
        "",
        f"| method | {final} | train loss, first {window} steps | final train loss | area under the train curve "
        "| steps to train target |",
        "|---|---|---|---|---|---|",
    ]
    for label, entry in results["methods"].items():
        mean, std = entry["mean"], entry["std"]
        reached = len([r for r in entry["runs"].values() if r.get("train_steps_to_target") is not None])
        lines.append(
            f"| {label} | {_fmt(mean['final_eval_loss'], std['final_eval_loss'])} | "
            f"{_fmt(mean.get('train_loss_first'), std.get('train_loss_first'))} | "
            f"{_fmt(mean.get('train_loss_final'), std.get('train_loss_final'))} | "
            f"{_fmt(mean.get('train_curve_area'), std.get('train_curve_area'))} | "
            f"{_fmt(mean.get('train_steps_to_target'), std.get('train_steps_to_target'), 0)} "
            f"({reached}/{len(entry['runs'])}) |"
        )
    return lines


def _reused_lines(results: dict) -> list[str]:
    """Which runs came from an earlier comparison's results.json (`--reuse`), not from this one's training."""
    by_source: dict[str, list[str]] = {}
    for label, entry in results["methods"].items():
        seeds = [seed for seed, run in entry["runs"].items() if run.get("reused_from")]
        for source in {entry["runs"][seed]["reused_from"] for seed in seeds}:
            mine = [s for s in seeds if entry["runs"][s]["reused_from"] == source]
            by_source.setdefault(source, []).append(f"{label} (seed{'s' if len(mine) > 1 else ''} {', '.join(mine)})")
    if not by_source:
        return []
    lines = ["", "Runs taken from an earlier comparison of the same setting (`--reuse`), not trained in this one:", ""]
    return lines + [f"- {source}: {'; '.join(labels)}" for source, labels in by_source.items()]


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.1f}%" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}%"
