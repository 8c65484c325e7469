"""Per-method learning-rate sweeps that extend past an edge (with a fake `run_one` whose loss is a known function of
the rate), the report and results.json fields they produce, and the Pareto and loss-against-time plots."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from PIL import Image

from lorakit.compare import runner
from lorakit.compare.spec import DOCUMENTED_LR, initial_grid, parse_methods, parse_sweep
from lorakit.errors import ConfigError
from lorakit.training.run_config import TrainConfig


def parabola(optimum: float, diverge_above: float = math.inf):
    """A fake run_one: final loss (log10 lr - log10 optimum)² + 1; diverged above `diverge_above`. Records calls."""
    calls = []

    def run_one(cfg, label, train=True):
        calls.append(cfg.lr)
        if cfg.lr > diverge_above:
            return {
                "status": "diverged",
                "diverged": True,
                "error": "non-finite loss",
                "train_curve": [],
                "eval_curve": [],
            }
        loss = (math.log10(cfg.lr) - math.log10(optimum)) ** 2 + 1.0
        return {"status": "ok", "final_eval_loss": loss, "train_curve": [[1, loss]], "eval_curve": [[1, loss]]}

    run_one.calls = calls
    return run_one


def sweep(monkeypatch, tmp_path, rates, fake, **kwargs):
    monkeypatch.setattr(runner, "run_one", fake)
    spec = parse_methods("lora")[0]
    return runner.sweep_learning_rate(TrainConfig(out=str(tmp_path)), spec, rates, 5, tmp_path / "sweep", **kwargs)


GRID = [1e-4, 3e-4, 9e-4]


def test_optimum_inside_the_grid_needs_no_extension(monkeypatch, tmp_path):
    fake = parabola(3e-4)
    result = sweep(monkeypatch, tmp_path, GRID, fake)
    assert result["lr"] == 3e-4 and result["extended"] == [] and not result["at_edge"]
    assert fake.calls == GRID
    assert list(result["losses"]) == ["0.0001", "0.0003", "0.0009"]


def test_optimum_above_the_grid_extends_it_until_the_best_rate_is_inside(monkeypatch, tmp_path):
    fake = parabola(5e-3)  # between 2.7e-3 and 8.1e-3 on the x3 ladder, nearer 8.1e-3 in log
    result = sweep(monkeypatch, tmp_path, GRID, fake)
    assert result["extended"] == [0.0027, 0.0081, 0.0243]
    assert result["lr"] == 0.0081 and not result["at_edge"] and result["finished"]
    assert fake.calls == GRID + [0.0027, 0.0081, 0.0243]
    assert result["grid"] == GRID
    assert list(result["losses"]) == ["0.0001", "0.0003", "0.0009", "0.0027", "0.0081", "0.0243"]


def test_optimum_below_the_grid_extends_it_downwards(monkeypatch, tmp_path):
    result = sweep(monkeypatch, tmp_path, GRID, parabola(4e-5))
    assert result["extended"] == [pytest.approx(1e-4 / 3, rel=1e-5), pytest.approx(1e-4 / 9, rel=1e-5)]
    assert result["lr"] == result["extended"][0] and not result["at_edge"]  # 3.3e-5 beats both neighbours
    assert list(result["losses"])[:2] == ["1.11111e-05", "3.33333e-05"]


def test_extensions_stop_at_the_limit_and_flag_the_edge(monkeypatch, tmp_path):
    fake = parabola(1.0)
    result = sweep(monkeypatch, tmp_path, GRID, fake)
    assert result["extended"] == [0.0027, 0.0081, 0.0243]  # MAX_EXTENSIONS = 3
    assert result["lr"] == 0.0243 and result["at_edge"]
    assert len(fake.calls) == 6
    capped = sweep(monkeypatch, tmp_path, GRID, parabola(1.0), max_extensions=1)
    assert capped["extended"] == [0.0027] and capped["at_edge"]


def test_a_diverged_rate_past_the_edge_ends_the_extension(monkeypatch, tmp_path):
    result = sweep(monkeypatch, tmp_path, GRID, parabola(1.0, diverge_above=3e-3))
    assert result["extended"] == [0.0027, 0.0081]
    assert result["losses"]["0.0081"] == "diverged"
    assert result["lr"] == 0.0027 and not result["at_edge"]


def test_nothing_finished_lowers_the_rate_and_all_failed_stops(monkeypatch, tmp_path):
    diverging = sweep(monkeypatch, tmp_path, GRID, parabola(1e-5, diverge_above=1e-7))
    assert len(diverging["extended"]) == 3 and diverging["at_edge"] and not diverging["finished"]
    assert diverging["lr"] == min(diverging["extended"])

    def failing(cfg, label, train=True):
        return {"status": "failed", "error": "boom", "train_curve": [], "eval_curve": []}

    failed = sweep(monkeypatch, tmp_path, GRID, failing)
    assert failed["extended"] == [] and not failed["at_edge"] and not failed["finished"] and failed["lr"] == 1e-4


def test_a_one_rate_grid_is_explored_both_ways(monkeypatch, tmp_path):
    result = sweep(monkeypatch, tmp_path, [1e-3], parabola(1e-4))
    assert result["extended"][0] == 0.003  # up first (the only rate is at both ends), worse: then down
    assert result["extended"][1:] == [pytest.approx(1e-3 / 3, rel=1e-5), pytest.approx(1e-3 / 9, rel=1e-5)]
    assert result["lr"] == pytest.approx(1e-3 / 9, rel=1e-5) and result["at_edge"]


# ---- grids: per method inline, auto, global ----


def test_inline_grids_and_auto():
    lora, mini, olora, mora = parse_methods("lora,mini:lr-sweep=1e-3/3e-3/1e-2,olora:lr=3e-4,mora:lr-sweep=auto")
    assert mini.sweep == [1e-3, 3e-3, 1e-2] and mini.overrides == {} and mini.label == "mini:lr-sweep=1e-3/3e-3/1e-2"
    assert initial_grid(mini, None) == [1e-3, 3e-3, 1e-2]  # its own grid
    assert initial_grid(mini, [1.0, 2.0]) == [1e-3, 3e-3, 1e-2]  # wins over the global one
    assert initial_grid(lora, None) is None  # no sweep asked for
    assert initial_grid(lora, [3e-3, 1e-3]) == [1e-3, 3e-3]
    assert initial_grid(olora, "auto") is None  # a fixed lr= is never swept
    assert initial_grid(mora, None) == [1e-4, 3e-4, 9e-4]
    # OLoRA's grid is centred 3x below LoRA's: the reproduction's sweeps chose about 9x below (README, The methods)
    olora_grid = initial_grid(parse_methods("olora")[0], "auto")
    assert olora_grid[1] == 1e-4 and olora_grid[1] < initial_grid(lora, "auto")[1]
    for name, rate in DOCUMENTED_LR.items():
        assert initial_grid(parse_methods(name)[0], "auto") == [
            pytest.approx(rate / 3, rel=1e-5),
            rate,
            pytest.approx(rate * 3, rel=1e-5),
        ]
    normal = parse_methods("mini:outer=normal")[0]
    assert initial_grid(normal, "auto")[1] == 3e-6
    # lr-sweep continues a method's comma-separated options like any other key
    (mini_ab,) = parse_methods("mini:a=8,lr-sweep=1e-3/1e-2")
    assert mini_ab.overrides == {"mini_a": 8} and mini_ab.sweep == [1e-3, 1e-2]
    (lorta,) = parse_methods("lorta:targets=q_proj/k_proj/v_proj/o_proj:lr-sweep=auto")
    assert lorta.overrides == {"targets": "q_proj,k_proj,v_proj,o_proj"} and initial_grid(lorta, None)[1] == 1e-3


@pytest.mark.parametrize(
    "text,message",
    [
        ("lora:lr=1e-3:lr-sweep=auto", "both lr= and lr-sweep="),
        ("lora:lr-sweep=1e-3/x", "must be 'auto' or learning rates"),
        ("lora:lr-sweep=1e-3/-1e-3", "not positive"),
        ("lora:lr-sweep=1e-3/1e-3", "repeats"),
        ("lora:q=1", "lr-sweep"),  # the error lists the key
    ],
)
def test_bad_inline_sweeps(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_methods(text)


def test_global_sweep_flag():
    assert parse_sweep("--lr-sweep", "AUTO") == "auto"
    assert parse_sweep("--lr-sweep", "3e-3,1e-4") == [1e-4, 3e-3]
    with pytest.raises(ConfigError, match="must be 'auto'"):
        parse_sweep("--lr-sweep", "fast")


# ---- the whole compare with a fake run_one: results.json and report.md ----

OPTIMA = {"lora": 3e-4, "olora": 3e-4, "mini": 1.0}  # mini's optimum is far above any grid: the sweep hits the cap
PARAMS = {"lora": 4_884_480, "olora": 4_884_480, "mini": 215_040}


def fake_run(cfg, label, train=True):
    loss = (math.log10(cfg.lr) - math.log10(OPTIMA[cfg.method])) ** 2 + 2.0 + 0.01 * cfg.seed
    times = [[0, 0.0], [1, 1.5], [2, 3.0]]
    return {
        "status": "ok",
        "diverged": False,
        "final_eval_loss": loss,
        "trainable_parameters": PARAMS[cfg.method],
        "adapter_bytes": 4 * PARAMS[cfg.method],
        "wall_time_s": 3.0,
        "tokens_per_s": 100.0,
        "peak_memory_bytes": 2**30,
        "train_curve": [[1, loss + 1], [2, loss + 0.5]],
        "eval_curve": [[0, loss + 2], [2, loss]],
        "time_curve": times,
    }


@pytest.fixture
def compared(tmp_path, monkeypatch):
    import lorakit.compare as compare
    from lorakit.cli import build_parser

    monkeypatch.setattr(compare, "run_one", fake_run)
    monkeypatch.setattr(runner, "run_one", fake_run)
    monkeypatch.setattr(
        compare, "score_exact_match", lambda cfg, data, n: {"exact_match": 0.25 * cfg.seed, "exact_match_examples": n}
    )
    out = tmp_path / "cmp"
    argv = [
        "compare", "--data", "uuid-pairs:n=8", "--methods", "lora,olora:lr=3e-4,mini:lr-sweep=1e-3/3e-3/1e-2",
        "--lr-sweep", "auto", "--seeds", "1,2", "--steps", "8", "--out", str(out),
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    args.argv = argv
    assert compare.run_compare_command(args) == 0
    return out


def test_results_mark_the_method_whose_rate_stayed_at_the_edge(compared):
    results = json.loads((compared / "results.json").read_text())
    lora, olora, mini = (results["methods"][k] for k in ("lora", "olora:lr=3e-4", "mini:lr-sweep=1e-3/3e-3/1e-2"))
    assert lora["lr_sweep_grid"] == [1e-4, 3e-4, 9e-4] and lora["lr"] == 3e-4  # auto: centred on LoRA's 3e-4
    assert lora["lr_sweep_extended"] == [] and lora["lr_at_sweep_edge"] is False
    assert "lr_sweep_grid" not in olora and olora["lr_sweep"] is None and olora["lr"] == 3e-4
    assert mini["lr_sweep_grid"] == [1e-3, 3e-3, 1e-2]  # its own grid, not auto's
    assert mini["lr_sweep_extended"] == [0.03, 0.09, 0.27] and mini["lr"] == 0.27
    assert mini["lr_at_sweep_edge"] is True
    assert results["sweep"] == {"steps": 2, "factor": 3.0, "max_extensions": 3}
    assert mini["mean"]["exact_match"] == pytest.approx(0.375)
    assert results["exact_match"] == {"data": "uuid-pairs:n=8", "examples": 8}
    assert results["setting"]["eval_data"] == "uuid-pairs:n=8"


def test_report_lists_rates_losses_extensions_and_warns_at_the_edge(compared):
    report = (compared / "report.md").read_text()
    assert (
        "Learning-rate sweep (final loss of a 2-step run per rate, first seed; a best rate at an end of its grid"
        in report
    )
    line = next(line for line in report.splitlines() if line.startswith("- mini:lr-sweep"))
    assert "chosen 0.27; grid 0.001, 0.003, 0.01; extended to 0.03, 0.09, 0.27 (3 extensions)" in line
    assert "lr 0.001: " in line and "lr 0.27: " in line
    lora = next(line for line in report.splitlines() if line.startswith("- lora: "))
    assert "chosen 0.0003; grid 0.0001, 0.0003, 0.0009 —" in lora
    assert (
        "- **warning**: mini:lr-sweep=1e-3/3e-3/1e-2: the best rate 0.27 is still at the upper end of its sweep after "
        "3 extensions" in report
    )
    assert "warning**: lora" not in report
    assert "| mini:lr-sweep=1e-3/3e-3/1e-2 | 0.27 (swept, at edge) |" in report
    assert "| lora | 0.0003 (swept) |" in report and "| olora:lr=3e-4 | 0.0003 |" in report
    assert "| 37.5 ± 17.7% |" in report  # exact match, mean ± std over the two seeds (25% and 50%)


def test_every_plot_is_written(compared):
    for name in ("loss.png", "params.png", "pareto.png", "loss_vs_time.png"):
        with Image.open(compared / name) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_a_resumed_compare_repeats_the_same_sweep(compared, monkeypatch):
    """The extension path depends only on the losses, so a rerun asks for the same rates (run_one skips them)."""
    import lorakit.compare as compare
    from lorakit.cli import build_parser

    asked = []

    def recording(cfg, label, train=True):
        asked.append((cfg.method, cfg.lr, cfg.steps))
        return fake_run(cfg, label)

    monkeypatch.setattr(compare, "run_one", recording)
    monkeypatch.setattr(runner, "run_one", recording)
    monkeypatch.setattr(
        compare, "score_exact_match", lambda cfg, data, n: {"exact_match": 0.0, "exact_match_examples": n}
    )
    argv = [
        "compare", "--data", "uuid-pairs:n=8", "--methods", "lora,olora:lr=3e-4,mini:lr-sweep=1e-3/3e-3/1e-2",
        "--lr-sweep", "auto", "--seeds", "1,2", "--steps", "8", "--out", str(compared),
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    args.argv = argv
    assert compare.run_compare_command(args) == 0
    mini_sweep = [lr for method, lr, steps in asked if method == "mini" and steps == 2]
    assert mini_sweep == [1e-3, 3e-3, 1e-2, 0.03, 0.09, 0.27]


# ---- report and plots from a synthetic results dict ----


def _run(loss, seed_shift=0.0, elapsed=(0.0, 2.0, 4.0)):
    return {
        "status": "ok",
        "final_eval_loss": loss,
        "trainable_parameters": 1000,
        "train_curve": [[1, loss + 1.0], [2, loss + 0.5]],
        "eval_curve": [[0, loss + 2.0], [2, loss]],
        "time_curve": [[0, elapsed[0]], [1, elapsed[1] + seed_shift], [2, elapsed[2] + seed_shift]],
    }


def _synthetic(seeds):
    from lorakit.compare.report import summarise

    methods = {}
    for label, params, loss in (
        ("lora", 4_884_480, 3.30),
        ("mini", 215_040, 3.32),
        ("loraxs", 53_760, 3.50),
        ("bad", 10**6, 3.6),
    ):
        runs = {str(s): {**_run(loss + 0.01 * s, 0.1 * s), "trainable_parameters": params} for s in seeds}
        methods[label] = {"method": label, "lr": 1e-3, "lr_sweep": None, "runs": runs}
    setting = dict(model="m", data="d", steps=2, batch_size=1, grad_accum=1, max_length=8, schedule="cosine", warmup=0)
    methods, target = summarise(methods, None)
    return {"setting": setting, "seeds": seeds, "has_eval": True, "target_loss": target, "methods": methods}


def test_pareto_and_time_plots_from_a_synthetic_results_dict(tmp_path):
    from lorakit.compare.plots import plot_loss_vs_time, plot_pareto

    for seeds in ([1, 2, 3], [1]):
        results = _synthetic(seeds)
        plot_pareto(results, tmp_path / "pareto.png")
        plot_loss_vs_time(results, tmp_path / "loss_vs_time.png")
        plot_loss_vs_time(results, tmp_path / "log.png", log_scale=True)
        for name in ("pareto.png", "loss_vs_time.png", "log.png"):
            assert (tmp_path / name).stat().st_size > 0
            with Image.open(tmp_path / name) as image:
                assert image.format == "PNG"


def test_plots_survive_runs_without_times_or_results():
    from lorakit.compare.plots import plot_loss_vs_time, plot_pareto

    results = _synthetic([1, 2])
    results["methods"]["lora"]["runs"]["1"]["time_curve"] = []  # a run written before times were recorded
    results["methods"]["mini"]["runs"] = {"1": {"status": "failed", "error": "x", "train_curve": [], "eval_curve": []}}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        plot_pareto(results, Path(directory) / "p.png")
        plot_loss_vs_time(results, Path(directory) / "t.png")
        assert (Path(directory) / "p.png").stat().st_size > 0 and (Path(directory) / "t.png").stat().st_size > 0


def test_pareto_front():
    from lorakit.compare.plots import pareto_front

    points = [(4_884_480, 3.30, "lora"), (215_040, 3.32, "mini"), (53_760, 3.50, "loraxs"), (10**6, 3.6, "bad")]
    assert [label for _, _, label in pareto_front(points)] == ["loraxs", "mini", "lora"]
    assert pareto_front([]) == []


def test_plot_labels_drop_the_sweep_grid_and_keep_every_other_option():
    from lorakit.compare.plots import plot_label

    assert plot_label("lorta:targets=q_proj/k_proj:lr-sweep=2.7e-2/8.1e-2/2.43e-1") == "lorta:targets=q_proj/k_proj"
    assert plot_label("mini:lr-sweep=1e-3/3e-3:a=64") == "mini:a=64"
    assert plot_label("lora:procedure=cola/links=3") == "lora:procedure=cola/links=3"


def test_one_seed_table_has_no_zero_spread():
    from lorakit.compare.report import markdown

    report = markdown(_synthetic([1]))
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows and not any("±" in row for row in rows)
    assert "± 0.000" not in report and "no spread measured" in report
    assert "![pareto](pareto.png)" in report and "![loss against wall time](loss_vs_time.png)" in report


def test_lr_sweep_on_a_tiny_model_extends_past_the_best_end(tiny_model_dir, instruction_file, tmp_path):
    """Real (tiny) training runs: the grid 1e-5, 1e-2 is extended upwards while its top rate is the best."""
    import subprocess
    import sys

    args = [
        "compare", "--model", tiny_model_dir, "--data", instruction_file, "--methods", "lora", "--seeds", "1",
        "--steps", "4", "--rank", "4", "--max-length", "64", "--quiet", "--lr-sweep", "1e-5,1e-2",
        "--sweep-steps", "4", "--out", tmp_path / "s",
    ]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entry = json.loads((tmp_path / "s" / "results.json").read_text())["methods"]["lora"]
    assert entry["lr_sweep_grid"] == [1e-05, 0.01]
    rates = [float(rate) for rate in entry["lr_sweep"]]
    assert rates == sorted(rates) and rates[:2] == [1e-05, 0.01] and rates[2:] == entry["lr_sweep_extended"]
    finished = {float(k): v for k, v in entry["lr_sweep"].items() if not isinstance(v, str)}
    assert entry["lr"] == min(finished, key=finished.get) >= 0.01
    assert entry["lr_at_sweep_edge"] == (len(entry["lr_sweep_extended"]) == 3 and entry["lr"] == max(rates))
    report = (tmp_path / "s" / "report.md").read_text()
    assert "Learning-rate sweep" in report and "± 0" not in report


def test_a_procedure_is_plotted_and_reported_at_its_saved_adapter_size(tmp_path):
    """Chain of LoRA trains r at once and saves every link: its point is at the saved count, and the table says both."""
    from lorakit.compare.plots import plotted_parameters
    from lorakit.compare.report import markdown, summarise

    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"final_eval_loss": 3.3, "trainable_parameters": 4096}))
    (out / "adapter" / "adapter.json").write_text(json.dumps({"trainable_parameters": 12288}))
    finished = runner._finished(out)
    assert finished["adapter_parameters"] == 12288 and finished["trainable_parameters"] == 4096

    (out / "adapter" / "adapter.json").write_text("{not json")  # unreadable: the summary falls back to trainable
    unreadable = runner._finished(out)
    assert unreadable["adapter_parameters"] is None
    fallback, _ = summarise({"lora": {"runs": {"1": unreadable}}}, None)
    assert fallback["lora"]["adapter_parameters"] == 4096

    results = _synthetic([1, 2])
    for run in results["methods"]["lora"]["runs"].values():
        run["adapter_parameters"] = 3 * run["trainable_parameters"]
    results["methods"], _ = summarise(results["methods"], None)
    lora, mini = results["methods"]["lora"], results["methods"]["mini"]
    assert plotted_parameters(lora) == 3 * 4_884_480 and plotted_parameters(mini) == 215_040
    report = markdown(results)
    assert "| lora | 0.001 | 4,884,480 (adapter: 14,653,440) |" in report
    assert "| mini | 0.001 | 215,040 |" in report


def test_report_only_trains_nothing_and_marks_what_is_pending(monkeypatch, tmp_path):
    """A sweep whose second rate has not run stops there (lr pending); a finished rate and run are reported."""
    finished = {0.0003: 3.5}

    def on_disk(cfg, label, *, train=True):
        assert not train, "--report-only must not train"
        if cfg.lr in finished and "sweep" in cfg.out:
            return {"status": "ok", "final_eval_loss": finished[cfg.lr], "train_curve": [], "eval_curve": []}
        return runner.pending()

    monkeypatch.setattr(runner, "run_one", on_disk)
    base = TrainConfig(steps=8, out=str(tmp_path))
    spec = parse_methods("lora")[0]
    result = runner.sweep_learning_rate(base, spec, [1e-4, 3e-4, 9e-4], 2, tmp_path / "sweep", train=False)
    assert result["pending"] and result["lr"] is None
    assert result["losses"] == {"0.0001": "pending"}

    finished[0.0001] = 3.6
    result = runner.sweep_learning_rate(base, spec, [1e-4, 3e-4, 9e-4], 2, tmp_path / "sweep", train=False)
    assert result["pending"] and result["losses"] == {"0.0001": 3.6, "0.0003": 3.5, "0.0009": "pending"}


def test_a_partial_report_says_so_and_keeps_pending_runs_out_of_the_figures():
    from lorakit.compare.report import markdown, summarise

    results = _synthetic([1, 2])
    results["methods"]["lora"]["runs"]["2"] = runner.pending()
    results["methods"]["mini"].update(lr=None, lr_sweep={"0.001": "pending"}, lr_sweep_pending=True)
    results["methods"]["mini"]["runs"] = {s: runner.pending("waits for its learning-rate sweep") for s in ("1", "2")}
    results["methods"], _ = summarise(results["methods"], None)
    lora = results["methods"]["lora"]
    assert lora["finished_runs"] == 1 and lora["pending_runs"] == 1 and lora["std"]["final_eval_loss"] is None
    report = markdown(results)
    assert "**Partial report**: 5 of 8 runs have finished; the other 3 are pending" in report
    assert "(1 of 2 seeds; 1 pending)" in report and "| mini | pending |" in report
    assert "- mini seed 1: pending: waits for its learning-rate sweep" in report
    assert "warning" not in report  # a pending sweep is not a sweep that found nothing


def _documented_variants() -> set[str]:
    """Every inline variant README.md names in backquotes, and every variant of the reproduction script."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    methods = "lora|olora|mini|loraxs|melora|prolora|mora|lorta"
    found = set(re.findall(rf"`((?:{methods}):[^`\s]+)`", (root / "README.md").read_text()))
    script = (root / "docs" / "reproduction" / "run_claims.sh").read_text()
    for listed in re.findall(r'^[A-Z_0-9]+\+?="([^"]+)"', script, flags=re.M):  # METHODS, MELORA_HIGH, ...
        found.update(item for item in listed.split(",") if re.match(rf"(?:{methods})(?::|$)", item))
    return found


def test_every_variant_the_docs_name_is_a_valid_compare_method(tmp_path):
    """What `lorakit compare` checks before training (every spec parsed and its configuration validated), for each
    variant the docs show: none of the documented forms can fail at the start of a comparison."""
    variants = _documented_variants()
    assert {
        "lora:procedure=cola/links=3",
        "lora:optimizer=rite",
        "lorta:targets=q_proj/k_proj/v_proj/o_proj",
    } <= variants
    assert {"lora:procedure=increlora:r=8", "mini:a=64,b=64"} <= variants and len(variants) >= 12
    base = TrainConfig(model="m", data="stdlib-docstrings", out=str(tmp_path / "out"), rank=16)
    for text in sorted(variants):
        for spec in parse_methods(text):
            dataclasses.replace(base, **spec.overrides, method=spec.method).validate()
