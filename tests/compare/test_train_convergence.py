"""Training-loss convergence in compare's report (issue 28 item 21): the train loss over the first steps, the final
smoothed train loss, the area under the smoothed train curve and the steps to a train-loss target, on synthetic
curves whose answers are worked out by hand, and on the committed reproduction results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.compare.report import (
    TRAIN_WINDOW,
    markdown,
    summarise,
    summarise_training,
    train_convergence,
    train_steps_to_target,
)

REPRODUCTION = Path(__file__).resolve().parents[2] / "docs" / "reproduction"


def _line(steps: int, start: float = 10.0) -> list[list[float]]:
    """loss = start - t at steps t = 1..steps."""
    return [[t, start - t] for t in range(1, steps + 1)]


def test_window_is_ten_steps():
    assert TRAIN_WINDOW == 10  # the report's text and docs/reproduction.md state this window


def test_a_straight_line_has_the_hand_computed_area_and_target_step():
    # l_t = 10 - t. Trailing mean over 10 steps: s_t = 9.5 - t/2 for t <= 10 (mean of l_1..l_t), 14.5 - t after.
    # Both pieces are linear, so the trapezoidal rule is exact: the integral of 9.5 - t/2 over [1, 10] is 60.75 and
    # of 14.5 - t over [10, 20] is -5; over a span of 19 steps the mean height is 55.75 / 19.
    result = train_convergence(_line(20))
    assert result["train_loss_first"] == pytest.approx(4.5)  # mean of 9, 8, ..., 0
    assert result["train_loss_final"] == pytest.approx(-5.5)  # mean of l_11..l_20 = -1 .. -10
    assert result["train_curve_area"] == pytest.approx(55.75 / 19)
    # s_t <= 3: 9.5 - t/2 <= 3 needs t >= 13 (not in the first piece); 14.5 - t <= 3 from t = 11.5, so step 12
    assert train_steps_to_target(_line(20), 3.0) == 12
    assert train_steps_to_target(_line(20), -6.0) is None  # never reached


def test_area_uses_the_logged_steps_and_a_constant_curve_is_its_own_area():
    flat = [[2, 1.5], [4, 1.5], [10, 1.5]]  # irregular logging: the area is still the mean height
    assert train_convergence(flat)["train_curve_area"] == pytest.approx(1.5)
    # two points 4 steps apart, window 1 (no smoothing): trapezoid (3 + 1) / 2 * 4 over a span of 4
    assert train_convergence([[1, 3.0], [5, 1.0]], window=1)["train_curve_area"] == pytest.approx(2.0)
    assert train_convergence([[1, 2.0]])["train_curve_area"] == 2.0  # one point: no span
    assert train_convergence([]) == {"train_loss_first": None, "train_loss_final": None, "train_curve_area": None}


def _synthetic() -> dict:
    """fast: l_t = 10 - t; slow: 12 - t (2 above at every step); seed 2 of slow shifted by +1; seed 3 of slow failed."""

    def run(curve, loss):
        return {"status": "ok", "final_eval_loss": loss, "train_curve": curve, "eval_curve": [[20, loss]]}

    failed = {"status": "failed", "error": "boom", "train_curve": [], "eval_curve": []}
    methods = {
        "fast": {"method": "lora", "lr": 1e-3, "lr_sweep": None, "runs": {"1": run(_line(20), 3.0)}},
        "slow": {
            "method": "olora",
            "lr": 1e-3,
            "lr_sweep": None,
            "runs": {"1": run(_line(20, 12.0), 3.1), "2": run(_line(20, 13.0), 3.2), "3": failed},
        },
    }
    methods, target = summarise(methods, None)
    train_target = summarise_training(methods)
    setting = dict(model="m", data="d", steps=20, batch_size=1, grad_accum=1, max_length=8, schedule="cosine", warmup=0)
    return {
        "setting": setting,
        "seeds": [1, 2, 3],
        "has_eval": True,
        "target_loss": target,
        "train_convergence": {"window": TRAIN_WINDOW, "target_loss": train_target},
        "methods": methods,
    }


def test_summarise_training_target_steps_and_means_on_synthetic_runs():
    results = _synthetic()
    fast, slow = results["methods"]["fast"], results["methods"]["slow"]
    # finals: fast -5.5; slow -3.5 and -2.5 (mean -3.0, the worst): the target every method reaches on average
    assert results["train_convergence"]["target_loss"] == pytest.approx(-3.0)
    # s_t = 14.5 - t (+2, +3 for slow) <= -3 from t = 17.5 (fast), 19.5 and 20.5 (slow): 18, 20, never
    assert fast["runs"]["1"]["train_steps_to_target"] == 18
    assert [slow["runs"][s]["train_steps_to_target"] for s in "123"] == [20, None, None]
    assert slow["mean"]["train_steps_to_target"] == 20 and slow["std"]["train_steps_to_target"] is None
    assert slow["mean"]["train_loss_first"] == pytest.approx(7.0)  # 6.5 and 7.5; the failed run is left out
    assert slow["std"]["train_loss_first"] == pytest.approx(2**-0.5)
    assert slow["mean"]["train_curve_area"] == pytest.approx(55.75 / 19 + 2.5)
    assert fast["mean"]["train_loss_final"] == pytest.approx(-5.5) and fast["std"]["train_loss_final"] is None
    report = markdown(results)
    assert "smoothed by a trailing moving average over 10 logged steps" in report and "at most -3.000" in report
    assert f"| fast | 3.000 | 4.500 | -5.500 | {55.75 / 19:.3f} | 18 (1/1) |" in report
    assert f"| slow | 3.150 ± 0.071 | 7.000 ± 0.707 | -3.000 ± 0.707 | {55.75 / 19 + 2.5:.3f} ± 0.707 | 20 (1/3) |" in report
    results.pop("train_convergence")  # a results.json written before these metrics: no table, no error
    assert "Training-loss convergence" not in markdown(results)


@pytest.mark.parametrize(
    "part, lora, olora",
    [
        # issue 28 item 21: mean train loss over steps 1-10 and over the last 10 steps, LoRA and OLoRA each at
        # its own swept rate, mean over seeds 1-3
        ("stdlib-docstrings", (3.605, 2.891), (3.519, 2.889)),
        ("manpages-summaries", (3.985, 2.702), (3.865, 2.827)),
    ],
)
def test_committed_reports_hold_the_training_convergence_of_the_committed_runs(part, lora, olora):
    results = json.loads((REPRODUCTION / part / "results.json").read_text())
    methods, _ = summarise(results["methods"], results["target_loss"])
    summarise_training(methods)
    for label, (first, final) in (("lora", lora), ("olora", olora)):
        assert round(methods[label]["mean"]["train_loss_first"], 3) == first
        assert round(methods[label]["mean"]["train_loss_final"], 3) == final
    # the committed report.md and results.json were regenerated with these metrics (REPORT_ONLY=1 run_claims.sh)
    report = (REPRODUCTION / part / "report.md").read_text()
    assert "Training-loss convergence" in report
    assert f"| olora | {methods['olora']['mean']['final_eval_loss']:.3f} ± " in report
    assert results["train_convergence"]["window"] == TRAIN_WINDOW
    assert results["methods"]["olora"]["mean"]["train_curve_area"] == pytest.approx(
        methods["olora"]["mean"]["train_curve_area"]
    )
