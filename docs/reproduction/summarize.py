"""The figures behind docs/reproduction.md's claims table and README's "which method when", read from results.json.

    python docs/reproduction/summarize.py docs/reproduction/stdlib-docstrings/results.json [reference-label]

Prints one markdown table per file. Every figure is computed here from the per-seed runs in results.json, so the
claims table can be checked against the committed results:
- loss: final eval loss, mean ± sample std over the finished seeds;
- Δ vs reference: mean difference to the reference method (default `lora`) and that difference in units of the
  pooled standard deviation of the two (|Δ| under 2 pooled std is read as "equal within seed noise");
- params: the parameters of the saved adapter (the trainable ones, except under a procedure: see compare/runner.py);
- params ×: the reference's params divided by this method's (>1: fewer parameters than the reference);
- eval curve: mean eval loss at each evaluation step;
- to ref. loss: the first evaluation step at which the method's mean eval loss reaches the reference's final mean.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def finished_runs(entry: dict) -> list[dict]:
    return [run for run in entry["runs"].values() if run.get("status") == "ok" and not run.get("diverged")]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def mean_eval_curve(runs: list[dict]) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, loss in run.get("eval_curve") or []:
            by_step.setdefault(int(step), []).append(loss)
    return [(step, statistics.fmean(losses)) for step, losses in sorted(by_step.items()) if len(losses) == len(runs)]


def first_step_at(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def pooled_std(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return ((a * a + b * b) / 2) ** 0.5


def summary_rows(results: dict, reference: str) -> list[dict]:
    ref_entry = results["methods"].get(reference)
    ref_runs = finished_runs(ref_entry) if ref_entry else []
    ref_loss = mean_std([r["final_eval_loss"] for r in ref_runs]) if ref_runs else (None, None)
    rows = []
    for label, entry in results["methods"].items():
        runs = finished_runs(entry)
        row = {
            "method": label,
            "lr": entry.get("lr"),
            "edge": bool(entry.get("lr_at_sweep_edge")),
            "seeds": len(runs),
            "failed": entry.get("failed_runs", 0),
            "diverged": entry.get("diverged_runs", 0),
            "pending": entry.get("pending_runs", 0),
        }
        if runs:
            loss, spread = mean_std([r["final_eval_loss"] for r in runs])
            curve = mean_eval_curve(runs)
            row.update(
                loss=loss,
                std=spread,
                params=runs[0].get("adapter_parameters") or runs[0]["trainable_parameters"],
                file_mb=runs[0]["adapter_bytes"] / 1e6,
                wall_s=statistics.fmean(r["wall_time_s"] for r in runs),
                curve=curve,
                exact=[r.get("exact_match") for r in runs],
            )
            if ref_runs and ref_loss[0] is not None:
                row["delta"] = loss - ref_loss[0]
                pooled = pooled_std(spread, ref_loss[1])
                row["delta_sd"] = row["delta"] / pooled if pooled else None
                ref_params = ref_runs[0].get("adapter_parameters") or ref_runs[0]["trainable_parameters"]
                row["params_x"] = ref_params / row["params"]
                row["to_ref"] = first_step_at(curve, ref_loss[0])
        rows.append(row)
    return rows


def _num(value, form: str) -> str:
    return "—" if value is None else form.format(value)


def markdown(rows: list[dict], reference: str) -> str:
    lines = [
        f"| method | lr | seeds | params | params × ({reference}) | file MB | final eval loss | Δ vs {reference} "
        "(pooled sd) | to ref. loss | wall s | exact match | eval curve (step: loss) |",
        "|---" * 12 + "|",
    ]
    for row in rows:
        lr = "pending" if row["lr"] is None else f"{row['lr']:g}" + (" (edge)" if row["edge"] else "")
        if "loss" not in row:
            lines.append(
                f"| {row['method']} | {lr} | 0 (failed {row['failed']}, diverged {row['diverged']}, pending {row['pending']}) |"
                + " — |" * 9
            )
            continue
        loss = f"{row['loss']:.3f}" + (f" ± {row['std']:.3f}" if row["std"] is not None else " (one seed)")
        delta = _num(row.get("delta"), "{:+.3f}") + (
            f" ({row['delta_sd']:+.1f})" if row.get("delta_sd") is not None else ""
        )
        exact = "/".join("—" if e is None else f"{e:.3f}" for e in row["exact"])
        curve = ", ".join(f"{step}: {loss:.3f}" for step, loss in row["curve"])
        lines.append(
            f"| {row['method']} | {lr} | {row['seeds']} | {row['params']:,} | {_num(row.get('params_x'), '{:.1f}')} | "
            f"{row['file_mb']:.2f} | {loss} | {delta} | {_num(row.get('to_ref'), '{}')} | {row['wall_s']:.0f} | "
            f"{exact} | {curve} |"
        )
    return "\n".join(lines)


def sweep_lines(results: dict) -> list[str]:
    lines = []
    for label, entry in results["methods"].items():
        sweep = entry.get("lr_sweep")
        if sweep:
            losses = ", ".join(
                f"{float(lr):g}: {loss if isinstance(loss, str) else f'{loss:.3f}'}" for lr, loss in sweep.items()
            )
            chosen = "pending" if entry["lr"] is None else f"{entry['lr']:g}"
            edge = " (at the edge)" if entry.get("lr_at_sweep_edge") else ""
            lines.append(f"- {label}: chose {chosen}{edge}; sweep eval loss {losses}")
    return lines


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path, reference = Path(argv[0]), (argv[1] if len(argv) > 1 else "lora")
    results = json.loads(path.read_text())
    print(f"## {path}\n")
    print(markdown(summary_rows(results, reference), reference))
    print("\nLearning-rate sweeps:\n")
    print("\n".join(sweep_lines(results)) or "(none)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
