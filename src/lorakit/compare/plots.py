"""The plots of a comparison, drawn from results.json alone (Agg backend, no display needed):

- loss.png: train and eval loss against step (mean line, band: min-max over seeds);
- params.png: final loss against trainable parameters (mean ± std); a procedure's point sits at its saved adapter's count;
- pareto.png: final loss against trainable parameters (log x; mean, bars: min-max over seeds), each point labelled,
  with the Pareto front (the methods no other method beats with fewer parameters) drawn as a step line;
- loss_vs_time.png: train and eval loss against wall time (from each run's log.jsonl `elapsed_s`; mean over seeds
  at the steps they share, band: min-max of the loss).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from .report import status


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def plot_label(label: str) -> str:
    """A variant's name as the plots print it: without its `lr-sweep=` grid (the report lists the grid and the rate
    it chose), so `lorta:targets=q_proj/k_proj:lr-sweep=2.7e-2/8.1e-2` reads `lorta:targets=q_proj/k_proj`."""
    return re.sub(r":lr-sweep=[^:]*", "", label)


def _band(curves: list[list[list[float]]]):
    """Steps common to all seeds, mean and (min, max) of the loss there."""
    if not curves or not all(curves):
        return None
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    values = np.array([[dict(map(tuple, c))[s] for s in steps] for c in curves], dtype=float)
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def _smooth(curve, window=5):
    out = []
    for i, (step, _) in enumerate(curve):
        chunk = [v for _, v in curve[max(0, i - window + 1) : i + 1]]
        out.append([step, sum(chunk) / len(chunk)])
    return out


def plot_loss(results: dict, path: Path, log_scale: bool = False) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, entry) in enumerate(results["methods"].items()):
        color, label = colors[index % len(colors)], plot_label(name)
        runs = [r for r in entry["runs"].values() if status(r) == "ok"]  # diverged / failed runs: not drawn
        for axis, key, smooth in ((axes[0], "train_curve", True), (axes[1], "eval_curve", False)):
            band = _band([_smooth(r[key]) if smooth else r[key] for r in runs])
            if band is None:
                continue
            steps, mean, low, high = band
            axis.plot(
                steps,
                mean,
                color=color,
                label=f"{label} (lr {entry['lr']:g})",
                marker="o" if not smooth else None,
                ms=3,
            )
            axis.fill_between(steps, low, high, color=color, alpha=0.2)
    axes[0].set_title("train loss (5-step moving mean; band: min-max over seeds)")
    axes[1].set_title("eval loss (band: min-max over seeds)")
    _finish_loss_figure(fig, axes, results, path, "step", "loss", log_scale)


def _finish_loss_figure(fig, axes, results: dict, path: Path, xlabel: str, ylabel: str, log_scale: bool) -> None:
    """Labels, grid, legends and title of a train/eval loss figure; write it to `path`."""
    for axis in axes:
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        if log_scale:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    fig.suptitle(f"{results['setting']['model']} on {results['setting']['data']}, seeds {results['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plotted_parameters(entry: dict) -> int | None:
    """A method's x in params.png and pareto.png: the parameters of its saved adapter, which `report.summarise`
    sets (equal to the trainable ones except under a procedure that keeps more or fewer than it trains at once)."""
    return entry.get("adapter_parameters")


def plot_params(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(6.5, 4.5))
    for name, entry in results["methods"].items():
        label = plot_label(name)
        mean, std = entry["mean"]["final_eval_loss"], entry["std"]["final_eval_loss"]
        params = plotted_parameters(entry)
        if not params or mean is None or not math.isfinite(mean):  # no finished run
            continue
        axis.errorbar([params], [mean], yerr=None if std is None else [std], fmt="o", capsize=4, label=label)
        axis.annotate(label, (params, mean), textcoords="offset points", xytext=(6, 6), fontsize=8)
    axis.set_xscale("log")
    axis.xaxis.set_minor_formatter(matplotlib_ticker().NullFormatter())  # minor labels overlap on short ranges
    axis.set_xlabel("trainable parameters of the saved adapter (log scale)")
    axis.set_ylabel("final loss (mean ± std over seeds)")
    axis.set_title("final loss against adapter size")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _final_spread(entry: dict) -> tuple[float, float, float] | None:
    """(mean, min, max) of the finished runs' final losses, or None."""
    from .runner import final_loss

    losses = [final_loss(r) for r in entry["runs"].values() if status(r) == "ok"]
    losses = [v for v in losses if v is not None and math.isfinite(v)]
    if not losses:
        return None
    return sum(losses) / len(losses), min(losses), max(losses)


def pareto_front(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (parameters, loss, label) points that no other point beats: none has at most as many parameters and a
    lower loss. Sorted by parameters."""
    front, best = [], math.inf
    for params, loss, label in sorted(points, key=lambda p: (p[0], p[1])):
        if loss < best:
            front.append((params, loss, label))
            best = loss
    return front


def plot_pareto(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(10, 5))
    points = []
    colors = plt.get_cmap("tab20")  # 20 distinct colours: a comparison of 14 variants repeats none
    for index, (name, entry) in enumerate(results["methods"].items()):
        label = plot_label(name)
        params, spread = plotted_parameters(entry), _final_spread(entry)
        if not params or spread is None:
            continue
        mean, low, high = spread
        stacked = sum(1 for p, m, _ in points if abs(math.log(p / params)) < 0.05 and abs(m - mean) < 0.01)
        points.append((params, mean, label))
        axis.errorbar(
            [params], [mean], yerr=[[mean - low], [high - mean]], fmt="o", capsize=4, ms=6, label=label, zorder=3,
            color=colors(index % 20),
        )  # fmt: skip
        # labels of (nearly) coinciding points are stacked instead of printed over each other
        axis.annotate(label, (params, mean), textcoords="offset points", xytext=(6, 6 + 10 * stacked), fontsize=8)
    front = pareto_front(points)
    if front:
        xs, ys = [p for p, _, _ in front], [loss for _, loss, _ in front]
        axis.step(xs, ys, where="post", color="black", alpha=0.5, lw=1, ls="--", label="Pareto front", zorder=2)
    axis.set_xscale("log")
    axis.margins(x=0.15, y=0.1)
    axis.xaxis.set_minor_formatter(matplotlib_ticker().NullFormatter())
    axis.set_xlabel("trainable parameters of the saved adapter (log scale)")
    axis.set_ylabel("final loss (mean; bars: min-max over seeds)")
    axis.set_title(f"final loss against adapter size, seeds {results['seeds']}")
    axis.grid(alpha=0.3, which="both")
    if points:  # beside the axes, where it hides no point
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time_band(runs: list[dict], key: str, smooth: bool):
    """Mean elapsed seconds, and mean / min / max loss, at the steps every run has both a loss and a time for."""
    curves, times = [], []
    for run in runs:
        curve = _smooth(run.get(key) or []) if smooth else run.get(key) or []
        clock = dict(map(tuple, run.get("time_curve") or []))
        curve = [[s, v] for s, v in curve if s in clock]
        if not curve:
            return None
        curves.append(curve)
        times.append(clock)
    band = _band(curves)
    if band is None or not len(band[0]):
        return None
    steps, mean, low, high = band
    seconds = np.array([[clock[s] for s in steps] for clock in times], dtype=float).mean(0)
    return seconds, mean, low, high


def plot_loss_vs_time(results: dict, path: Path, log_scale: bool = False) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, entry) in enumerate(results["methods"].items()):
        color, label = colors[index % len(colors)], plot_label(name)
        runs = [r for r in entry["runs"].values() if status(r) == "ok"]
        if not runs:
            continue
        for axis, key, smooth in ((axes[0], "train_curve", True), (axes[1], "eval_curve", False)):
            band = _time_band(runs, key, smooth)
            if band is None:
                continue
            seconds, mean, low, high = band
            axis.plot(seconds, mean, color=color, label=label, marker=None if smooth else "o", ms=3)
            axis.fill_between(seconds, low, high, color=color, alpha=0.2)
    axes[0].set_title("train loss (5-step moving mean) against wall time")
    axes[1].set_title("eval loss against wall time")
    xlabel = "wall time (s, mean over seeds; evaluations included)"
    _finish_loss_figure(fig, axes, results, path, xlabel, "loss (band: min-max over seeds)", log_scale)
