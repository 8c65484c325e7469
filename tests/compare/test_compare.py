"""`lorakit compare` on a tiny model: every output, every results field, resume skips finished runs."""

from __future__ import annotations

import json
import re
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
        "1e-5,1e-2",
        "--sweep-steps",
        "4",
        "--out",
        tmp_path / "s",
    ]
    result = subprocess.run(LORAKIT + [str(a) for a in args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entry = json.loads((tmp_path / "s" / "results.json").read_text())["methods"]["lora"]
    assert set(entry["lr_sweep"]) == {"1e-05", "0.01"} and entry["lr"] == 0.01
    assert "Learning-rate sweep" in (tmp_path / "s" / "report.md").read_text()


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
