"""loss.png (train and eval loss against step: mean line, band over seeds) and params.png (loss vs parameters)."""

from __future__ import annotations

import math
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
    for index, (label, entry) in enumerate(results["methods"].items()):
        color = colors[index % len(colors)]
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
    for axis in axes:
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        if log_scale:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    fig.suptitle(f"{results['setting']['model']} on {results['setting']['data']}, seeds {results['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(6.5, 4.5))
    for label, entry in results["methods"].items():
        mean, std = entry["mean"]["final_eval_loss"], entry["std"]["final_eval_loss"]
        params = entry.get("trainable_parameters")
        if not params or mean is None or not math.isfinite(mean):  # no finished run
            continue
        axis.errorbar([params], [mean], yerr=None if std is None else [std], fmt="o", capsize=4, label=label)
        axis.annotate(label, (params, mean), textcoords="offset points", xytext=(6, 6), fontsize=8)
    axis.set_xscale("log")
    axis.xaxis.set_minor_formatter(matplotlib_ticker().NullFormatter())  # minor labels overlap on short ranges
    axis.set_xlabel("trainable parameters (log scale)")
    axis.set_ylabel("final loss (mean ± std over seeds)")
    axis.set_title("final loss against adapter size")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
