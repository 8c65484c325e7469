"""`lorakit compare` on a tiny model: every output, every results field, resume skips finished runs."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys

import pytest
from PIL import Image

from lorakit.compare.spec import parse_methods

LORAKIT = [sys.executable, "-m", "lorakit"]
RUN_FIELDS = {
    "train_curve",
    "eval_curve",
    "final_eval_loss",
    "final_eval_perplexity",
    "steps_to_target",
    "trainable_parameters",
    "adapter_bytes",
    "wall_time_s",
    "tokens_per_s",
    "peak_memory_bytes",
}


def compare(model, data, out, *extra):
    args = [
        "compare",
        "--model",
        model,
        "--data",
        data,
        "--eval-data",
        data,
        "--methods",
        "lora,mini:lr=1e-1:a=8,b=8",
        "--seeds",
        "1,2",
        "--steps",
        "6",
        "--rank",
        "4",
        "--lr",
        "1e-2",
        "--max-length",
        "64",
        "--eval-every",
        "3",
        "--quiet",
        "--out",
        out,
        *extra,
    ]
    return subprocess.run(LORAKIT + [str(a) for a in args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def compared(tiny_model_dir, instruction_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    result = compare(tiny_model_dir, instruction_file, out)
    assert result.returncode == 0, result.stderr
    return out, result


def test_results_hold_every_field_per_method_and_seed(compared):
    out, _ = compared
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["lora", "mini:lr=1e-1:a=8,b=8"]
    for entry in results["methods"].values():
        assert set(entry["runs"]) == {"1", "2"}
        for run in entry["runs"].values():
            assert RUN_FIELDS <= run.keys()
            assert [s for s, _ in run["train_curve"]] == list(range(1, 7))
            assert [s for s, _ in run["eval_curve"]] == [0, 3, 6]
        assert {"final_eval_loss", "final_eval_perplexity", "steps_to_target"} <= entry["mean"].keys()
    lora, mini = results["methods"].values()
    assert mini["trainable_parameters"] < lora["trainable_parameters"]
    assert mini["lr"] == 0.1 and lora["lr"] == 0.01
    # same data order for every method: identical first-step losses at init (B = 0 means output = base)
    assert lora["runs"]["1"]["train_curve"][0][1] == pytest.approx(mini["runs"]["1"]["train_curve"][0][1], abs=1e-5)


def test_report_and_plots(compared):
    out, result = compared
    report = (out / "report.md").read_text()
    assert "| lora | 0.01 |" in report and "±" in report and "| mini:lr=1e-1:a=8,b=8 | 0.1 |" in report
    assert "| lora |" in result.stdout
    # training-loss convergence beside the eval loss (issue 28 item 21), from each run's per-step train loss
    results = json.loads((out / "results.json").read_text())
    assert results["train_convergence"]["window"] == 10 and "Training-loss convergence" in report
    for entry in results["methods"].values():
        for run in entry["runs"].values():
            losses = [loss for _, loss in run["train_curve"]]
            assert run["train_loss_first"] == pytest.approx(statistics.fmean(losses[:10]))
            assert run["train_loss_final"] == pytest.approx(statistics.fmean(losses[-10:]))
        assert entry["mean"]["train_curve_area"] is not None
    for name in ("loss.png", "params.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 300


def test_resume_skips_finished_runs(compared, tiny_model_dir, instruction_file):
    out, _ = compared
    before = (out / "runs" / "lora" / "seed-1" / "summary.json").stat().st_mtime_ns
    import shutil

    shutil.rmtree(out / "runs" / "lora" / "seed-2")  # as if interrupted before this run
    result = compare(tiny_model_dir, instruction_file, out)
    assert result.returncode == 0, result.stderr
    started = re.findall(r"^lorakit compare: (.+) seed (\d+)", result.stdout, flags=re.MULTILINE)
    assert started == [("lora", "2")]
    assert (out / "runs" / "lora" / "seed-1" / "summary.json").stat().st_mtime_ns == before


def test_report_only_rewrites_the_report_from_disk_and_trains_nothing(
    compared, tiny_model_dir, instruction_file, tmp_path
):
    import shutil

    out = tmp_path / "cmp"
    shutil.copytree(compared[0], out)
    mini = parse_methods("lora,mini:lr=1e-1:a=8,b=8")[1]
    shutil.rmtree(out / "runs" / mini.slug / "seed-2")  # as if the comparison were still running
    (out / "report.md").unlink()
    note = "Seed 2 of mini ran in [another comparison](../other/report.md)."
    result = compare(tiny_model_dir, instruction_file, out, "--report-only", "--note", note)
    assert result.returncode == 0, result.stderr
    assert not re.findall(r"^lorakit compare: .+ seed \d+", result.stdout, flags=re.MULTILINE)  # nothing trained
    assert not (out / "runs" / mini.slug / "seed-2").exists()
    report = (out / "report.md").read_text()
    assert "**Partial report**: 3 of 4 runs have finished; the other 1 are pending" in report
    # --note: the first paragraph under the title, above the partial-report line, and kept in results.json
    assert report.split("\n\n")[1] == note and report.index(note) < report.index("**Partial report**")
    results = json.loads((out / "results.json").read_text())
    assert results["note"] == note
    assert results["methods"][mini.label]["runs"]["2"]["status"] == "pending"
    assert results["methods"][mini.label]["finished_runs"] == 1 and results["methods"]["lora"]["finished_runs"] == 2

    fresh = compare(tiny_model_dir, instruction_file, out.parent / "never-run", "--report-only")
    assert fresh.returncode == 2 and "holds no comparison; run it without --report-only first" in fresh.stderr
    assert not (out.parent / "never-run").exists()


def test_a_different_comparison_in_the_same_dir_is_refused(compared, tiny_model_dir, instruction_file):
    out, _ = compared
    result = compare(tiny_model_dir, instruction_file, out, "--warmup", "2")
    assert result.returncode == 2 and "holds a different comparison" in result.stderr


def test_lr_sweep_keeps_the_best_rate(tiny_model_dir, instruction_file, tmp_path):
    args = [
        "compare",
        "--model",
        tiny_model_dir,
        "--data",
        instruction_file,
        "--methods",
        "lora",
        "--seeds",
        "1",
        "--steps",
        "4",
        "--rank",
        "4",
        "--max-length",
        "64",
        "--quiet",
        "--lr-sweep",
        "1e-5,1e-2,1e30",
        "--sweep-steps",
        "4",
        "--out",
        tmp_path / "s",
    ]
    result = subprocess.run(LORAKIT + [str(a) for a in args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entry = json.loads((tmp_path / "s" / "results.json").read_text())["methods"]["lora"]
    # the best rate lies inside the grid (the rate above it diverges): kept, and the grid is not extended
    assert set(entry["lr_sweep"]) == {"1e-05", "0.01", "1e+30"} and entry["lr"] == 0.01
    assert entry["lr_sweep"]["1e+30"] == "diverged" and not entry.get("lr_at_sweep_edge")
    report = (tmp_path / "s" / "report.md").read_text()
    assert "Learning-rate sweep" in report
    assert "± 0" not in report  # one seed: the value alone, not a spread of zero


@pytest.mark.parametrize(
    "text,expected",
    [
        ("lora,olora,mini", [("lora", {}), ("olora", {}), ("mini", {})]),
        ("mini:a=64,b=64,lora:r=4", [("mini", {"mini_a": 64, "mini_b": 64}), ("lora", {"rank": 4})]),
        ("mini:outer=normal:lr=3e-5", [("mini", {"mini_outer": "normal", "lr": 3e-5})]),
    ],
)
def test_method_specs(text, expected):
    assert [(s.method, s.overrides) for s in parse_methods(text)] == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("dora", "'dora' is not a method"),
        ("lora:q=1", "option 'q=1'"),
        ("lora,lora", "more than once"),
        ("lora:r=x", "not a valid int"),
    ],
)
def test_bad_method_specs(text, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(text)


def test_demo_fills_only_the_settings_not_given():
    from lorakit.cli import build_parser
    from lorakit.compare import DEMO, _apply_demo

    argv = ["compare", "--out", "x", "--demo", "--seeds", "1,2,3", "--steps=7"]
    args = build_parser().parse_args(argv)
    args.argv = argv
    _apply_demo(args)
    assert args.seeds == "1,2,3" and args.steps == 7
    assert args.methods == DEMO["methods"] and args.max_length == DEMO["max_length"]


def test_demo_runs_each_method_at_the_rate_the_reproduction_chose():
    """`make demo` gives each method the learning rate its sweep chose in the committed stdlib-docstrings
    reproduction (issue 28 item 17: OLoRA ran at LoRA's 3e-4, 3x its swept 1e-4), and its report says so."""
    from pathlib import Path

    from lorakit.compare import DEMO

    committed = Path(__file__).parents[2] / "docs" / "reproduction" / "stdlib-docstrings" / "results.json"
    chosen = {label: entry["lr"] for label, entry in json.loads(committed.read_text())["methods"].items()}
    demo = parse_methods(DEMO["methods"])
    assert [spec.method for spec in demo] == ["lora", "olora", "mini"]
    for spec in demo:
        assert spec.overrides["lr"] == pytest.approx(chosen[spec.method], rel=1e-9), spec.label
        assert f"{spec.overrides['lr']:g}" in DEMO["note"]


# ---- runs that do not finish: failed (a crash or a user error in the child) and diverged (non-finite loss) ----

EXP_50 = f"{math.exp(50):.6g}"  # 5.18471e+21: what a clamped perplexity of a diverged run used to put in the mean


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"results.json holds {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def troubled(tiny_model_dir, instruction_file, tmp_path_factory):
    """lora finishes; olora:r=64 fails in every child (rank larger than the 32-wide layers: a user error, exit 2);
    lora:lr=1e30 diverges in every child."""
    out = tmp_path_factory.mktemp("compare") / "troubled"
    result = compare(tiny_model_dir, instruction_file, out, "--methods", "lora,olora:r=64,lora:lr=1e30", "--steps", "4")
    return out, result


def test_a_failed_run_is_reported_as_failed_and_compare_exits_non_zero(troubled):
    out, result = troubled
    assert result.returncode == 2, result.stderr  # every failure was a user error in the child
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lorakit: error: 2 of 6 runs failed (first: olora:r=64 seed 1: --rank 64 is too large")
    assert "Traceback" not in result.stderr
    # the child's own message reached the user as it happened (stderr is teed, not swallowed)
    assert "lorakit: error: --rank 64 is too large for olora" in result.stderr
    results = _strict_json((out / "results.json").read_text())
    olora = results["methods"]["olora:r=64"]
    for run in olora["runs"].values():
        assert run["status"] == "failed" and run["exit_code"] == 2 and not run["diverged"]
        assert run["error"].startswith("--rank 64 is too large for olora on model.layers.0.self_attn.q_proj")
        assert "\n" not in run["error"]
    assert (olora["finished_runs"], olora["failed_runs"], olora["diverged_runs"]) == (0, 2, 0)
    assert olora["mean"]["final_eval_loss"] is None and olora["trainable_parameters"] is None
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| olora:r=64 |"))
    assert "(0 of 2 seeds; 2 failed)" in row
    assert "- olora:r=64 seed 1: failed: --rank 64 is too large for olora" in report
    assert "| lora |" in result.stdout  # the report was printed before the error


def test_a_diverged_run_is_counted_and_left_out_of_the_statistics(troubled):
    out, _ = troubled
    results = _strict_json((out / "results.json").read_text())
    diverged = results["methods"]["lora:lr=1e30"]
    for run in diverged["runs"].values():
        assert run["status"] == "diverged" and run["diverged"] and run["exit_code"] == 3
        assert run["error"].startswith("non-finite loss") and run["steps_to_target"] is None
    assert (diverged["finished_runs"], diverged["diverged_runs"], diverged["failed_runs"]) == (0, 2, 0)
    assert all(value is None for value in diverged["mean"].values())
    # the finished method's aggregates are its own runs' alone
    lora = results["methods"]["lora"]
    losses = [run["final_eval_loss"] for run in lora["runs"].values()]
    assert lora["finished_runs"] == 2 and all(run["status"] == "ok" for run in lora["runs"].values())
    assert lora["mean"]["final_eval_loss"] == pytest.approx(statistics.fmean(losses), rel=1e-12)
    assert lora["std"]["final_eval_loss"] == pytest.approx(statistics.stdev(losses), rel=1e-12)
    assert lora["mean"]["final_eval_perplexity"] == pytest.approx(statistics.fmean(map(math.exp, losses)), rel=1e-12)
    assert results["target_loss"] == pytest.approx(lora["mean"]["final_eval_loss"], rel=1e-12)
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| lora:lr=1e30 |"))
    assert "(0 of 2 seeds; 2 diverged)" in row
    lora_row = next(line for line in report.splitlines() if line.startswith("| lora |"))
    assert "±" in lora_row and "seeds;" not in lora_row
    assert "- lora:lr=1e30 seed 2: diverged: non-finite loss" in report
    for text in (report, (out / "results.json").read_text()):  # strict JSON above: no NaN / Infinity either
        assert EXP_50 not in text and "e+21" not in text
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert not any(re.search(r"\b(inf|nan)\b", line) for line in table)
    for name in ("loss.png", "params.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"


def test_resume_redoes_failed_runs_and_skips_diverged_ones(troubled, tiny_model_dir, instruction_file):
    out, _ = troubled
    result = compare(tiny_model_dir, instruction_file, out, "--methods", "lora,olora:r=64,lora:lr=1e30", "--steps", "4")
    assert result.returncode == 2
    started = re.findall(r"^lorakit compare: (\S+) seed (\d+) lr", result.stdout, flags=re.MULTILINE)
    assert started == [("olora:r=64", "1"), ("olora:r=64", "2")]
    results = _strict_json((out / "results.json").read_text())
    assert results["methods"]["lora:lr=1e30"]["diverged_runs"] == 2


def _run(status="ok", loss=None, error=None, curve=((1, 4.0), (2, 3.5))):
    run = {
        "status": status,
        "diverged": status == "diverged",
        "train_curve": [list(point) for point in curve],
        "eval_curve": [[0, 4.2]] + ([[2, loss]] if loss is not None else []),
    }
    if status == "ok":
        run.update(
            final_eval_loss=loss,
            trainable_parameters=1000,
            adapter_bytes=4000,
            tokens_per_s=100.0,
            wall_time_s=10.0,
            peak_memory_bytes=2**30,
        )
    else:
        run.update(error=error, exit_code={"diverged": 3, "failed": 1}[status])
    return run


def _results(methods: dict, seeds: list[int], target=None) -> dict:
    from lorakit.compare.report import summarise

    setting = dict(model="m", data="d", steps=2, batch_size=1, grad_accum=1, max_length=8, schedule="cosine", warmup=0)
    methods, target = summarise(methods, target)
    return {"setting": setting, "seeds": seeds, "has_eval": True, "target_loss": target, "methods": methods}


def test_report_aggregation_leaves_out_diverged_and_failed_runs(tmp_path):
    from lorakit.compare.plots import plot_loss, plot_params
    from lorakit.compare.report import markdown

    methods = {
        "a": {
            "method": "lora",
            "lr": 1e-3,
            "lr_sweep": None,
            "runs": {
                "1": _run(loss=3.29),
                "2": _run(loss=3.31),
                # a diverged run holds no summary: before, its loss counted as inf and its perplexity as exp(50)
                "3": _run("diverged", error="non-finite loss (nan) at step 2; training stopped"),
                "4": _run("failed", error="internal error: RuntimeError: boom; re-run with LORAKIT_DEBUG=1"),
            },
        },
        "b": {
            "method": "mini",
            "lr": 1e-2,
            "lr_sweep": None,
            "runs": {
                "1": _run(loss=3.5),
                "2": _run(loss=float("inf")),
                "3": _run("diverged", error="x"),
                "4": _run(loss=3.7),
            },
        },
        "c": {
            "method": "olora",
            "lr": 1.0,
            "lr_sweep": None,
            "runs": {str(s): _run("diverged", error="non-finite loss") for s in (1, 2, 3, 4)},
        },
    }
    results = _results(methods, [1, 2, 3, 4])
    a, b, c = (results["methods"][k] for k in "abc")
    assert a["mean"]["final_eval_loss"] == pytest.approx(3.30)
    assert a["std"]["final_eval_loss"] == pytest.approx(statistics.stdev([3.29, 3.31]))
    assert a["mean"]["final_eval_perplexity"] == pytest.approx((math.exp(3.29) + math.exp(3.31)) / 2)
    assert (a["finished_runs"], a["diverged_runs"], a["failed_runs"]) == (2, 1, 1)
    # a run that finished with a non-finite loss counts as diverged, never as a number
    assert b["runs"]["2"]["status"] == "diverged" and (b["finished_runs"], b["diverged_runs"]) == (2, 2)
    assert b["mean"]["final_eval_loss"] == pytest.approx(3.6)
    assert c["finished_runs"] == 0 and all(v is None for v in list(c["mean"].values()) + list(c["std"].values()))
    assert results["target_loss"] == pytest.approx(3.6)  # the worst finished mean; c has none
    assert a["runs"]["3"]["steps_to_target"] is None and a["runs"]["1"]["steps_to_target"] == 2
    json.dumps(results, allow_nan=False)  # results.json holds no NaN / inf
    report = markdown(results)
    rows = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| ") and " | " in line}
    assert "| 3.300 ± 0.014 (2 of 4 seeds; 1 diverged, 1 failed) |" in rows["a"]
    assert "| 3.600 ± 0.141 (2 of 4 seeds; 2 diverged) |" in rows["b"]
    assert "| — (0 of 4 seeds; 4 diverged) |" in rows["c"]
    assert "- a seed 4: failed: internal error: RuntimeError: boom" in report
    assert "- a seed 3: diverged: non-finite loss (nan) at step 2" in report
    assert "e+21" not in report
    assert not any(re.search(r"\b(inf|nan)\b", row) for row in rows.values())  # (error messages may say "nan")
    plot_loss(results, tmp_path / "loss.png")
    plot_params(results, tmp_path / "params.png")
    assert (tmp_path / "params.png").stat().st_size > 0


def test_one_seed_reports_the_value_without_a_spread():
    from lorakit.compare.report import markdown

    results = _results({"lora": {"method": "lora", "lr": 1e-3, "lr_sweep": None, "runs": {"1": _run(loss=3.25)}}}, [1])
    assert results["methods"]["lora"]["std"]["final_eval_loss"] is None
    report = markdown(results)
    row = next(line for line in report.splitlines() if line.startswith("| lora |"))
    assert "| 3.250 |" in row and "±" not in row
    assert "± 0.000" not in report and "no spread measured" in report


def test_a_run_another_compare_holds_is_skipped_as_pending(tmp_path, capsys):
    """Two compares on one --out: a run whose lock another process holds is not trained (no child starts) and is
    reported as pending with the reason."""
    from lorakit.compare import runner
    from lorakit.training.run_config import TrainConfig

    cfg = TrainConfig(model="m", data="d", out=str(tmp_path / "runs" / "lora" / "seed-1"), seed=1)
    with runner.claimed(tmp_path / "runs" / "lora" / "seed-1") as mine:
        assert mine
        with runner.claimed(tmp_path / "runs" / "lora" / "seed-1") as again:  # another open file: another holder
            assert not again
        outcome = runner.run_one(cfg, "lora")
    assert outcome["status"] == "pending" and outcome["error"] == runner.TAKEN
    assert "lora seed 1: another compare on this --out is training it; skipped" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "lora" / "seed-1").exists()
    with runner.claimed(tmp_path / "runs" / "lora" / "seed-1") as mine:  # released with its holder
        assert mine


def test_two_compares_on_one_out_share_the_runs_and_train_each_once(tiny_model_dir, instruction_file, tmp_path):
    """README: the same compare command in two shells uses two cores; every run is trained by exactly one of them,
    and the report of the one that ends last holds every run."""
    out = tmp_path / "shared"
    argv = ["compare", "--model", tiny_model_dir, "--data", instruction_file, "--methods", "lora,mini:a=8,b=8"]
    argv += ["--seeds", "1,2", "--steps", "6", "--rank", "4", "--lr", "1e-2", "--max-length", "64", "--quiet"]
    argv += ["--lr-sweep", "1e-3,1e-2", "--sweep-steps", "2", "--out", out]
    command = LORAKIT + [str(a) for a in argv]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    started = [
        line.removesuffix(" (resumed)")
        for stdout, _ in outputs
        for line in stdout.splitlines()
        if line.startswith("lorakit compare: ") and " seed " in line and " lr " in line and "skipped" not in line
    ]
    trained = list(out.glob("sweep/*/lr-*/summary.json")) + list(out.glob("runs/*/seed-*/summary.json"))
    assert len(started) == len(set(started)) == len(trained) >= 2 * 2 + 2 * 2  # each run trained once, by one of them
    results = json.loads((out / "results.json").read_text())
    assert all(run["status"] == "ok" for m in results["methods"].values() for run in m["runs"].values())
    assert all(m["lr"] is not None and not m["lr_sweep_pending"] for m in results["methods"].values())
    assert "Partial report" not in (out / "report.md").read_text()


def test_committed_stdlib_report_opens_with_where_its_pending_variants_ran():
    """docs/reproduction/stdlib-docstrings/report.md: the first paragraph says that IncreLoRA and LoRA-RITE ran in
    the float32 part and links it; it is the --note that run_claims.sh passes, so REPORT_ONLY=1 rewrites it."""
    from pathlib import Path

    reproduction = Path(__file__).parents[2] / "docs" / "reproduction"
    first = (reproduction / "stdlib-docstrings" / "report.md").read_text().split("\n\n")[1]
    assert "IncreLoRA and LoRA-RITE ran in float32" in first
    link = re.search(r"\]\((\.\./stdlib-docstrings-float32/report\.md)\)", first)
    assert link and (reproduction / "stdlib-docstrings" / link.group(1)).is_file()
    script = (reproduction / "run_claims.sh").read_text()
    note = "".join(re.findall(r'^STDLIB_NOTE\+?="(.*)"$', script, flags=re.M))
    assert note == first and '--note "$STDLIB_NOTE"' in script
    assert json.loads((reproduction / "stdlib-docstrings" / "results.json").read_text())["note"] == note
