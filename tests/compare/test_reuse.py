"""lorakit compare --reuse: an earlier comparison's results.json stands in for the runs whose directories are gone."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from lorakit.compare.reuse import ReusedResults
from lorakit.compare.spec import parse_methods
from lorakit.errors import ConfigError

LORAKIT = [sys.executable, "-m", "lorakit"]

SWEPT = "lora,mini:lr=1e-2:a=8,b=8"  # lora is swept, mini has a fixed rate


def compare(model, data, out, methods, seeds, *extra):
    args = ["compare", "--model", model, "--data", data, "--eval-data", data, "--methods", methods]
    args += ["--seeds", seeds, "--steps", "4", "--rank", "4", "--max-length", "64", "--eval-every", "2", "--quiet"]
    args += ["--lr-sweep", "1e-3,1e-2", "--sweep-steps", "2", "--out", out, *extra]
    return subprocess.run(LORAKIT + [str(a) for a in args], capture_output=True, text=True)


def started(stdout: str) -> list[str]:
    """The runs a compare trained: '<label> seed <n>' (sweep runs read '<label> (lr sweep) seed <n>')."""
    return re.findall(r"^lorakit compare: (.+ seed \d+) lr ", stdout, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def earlier(tiny_model_dir, instruction_file, tmp_path_factory):
    """A finished comparison of seed 1 whose run directories are then deleted: only its results.json is left."""
    out = tmp_path_factory.mktemp("reuse") / "earlier"
    result = compare(tiny_model_dir, instruction_file, out, SWEPT, "1")
    assert result.returncode == 0, result.stderr
    kept = out.parent / "earlier-results.json"
    shutil.copy(out / "results.json", kept)
    shutil.rmtree(out)
    return kept


def test_reused_runs_and_sweeps_are_not_trained_again_and_the_rest_is(
    earlier, tiny_model_dir, instruction_file, tmp_path
):
    before = json.loads(earlier.read_text())
    out = tmp_path / "again"
    result = compare(tiny_model_dir, instruction_file, out, SWEPT, "1,2", "--reuse", earlier)
    assert result.returncode == 0, result.stderr
    # neither sweep ran again, seed 1 was taken from the file, seed 2 trained at the reused rate
    assert sorted(started(result.stdout)) == ["lora seed 2", "mini:lr=1e-2:a=8,b=8 seed 2"]
    assert not (out / "sweep").exists()
    after = json.loads((out / "results.json").read_text())
    for label, entry in after["methods"].items():
        old = before["methods"][label]
        assert entry["lr"] == old["lr"] and entry["lr_sweep"] == old["lr_sweep"]
        assert entry["reused_from"] == str(earlier)
        assert entry["runs"]["1"]["final_eval_loss"] == old["runs"]["1"]["final_eval_loss"]
        assert entry["runs"]["1"]["eval_curve"] == old["runs"]["1"]["eval_curve"]
        assert entry["runs"]["1"]["reused_from"] == str(earlier) and "reused_from" not in entry["runs"]["2"]
        assert entry["runs"]["2"]["status"] == "ok" and entry["finished_runs"] == 2
        slug = next(spec.slug for spec in parse_methods(SWEPT) if spec.label == label)
        trained = json.loads((out / "runs" / slug / "seed-2" / "run.json").read_text())
        assert trained["config"]["lr"] == old["lr"]
    report = (out / "report.md").read_text()
    assert f"- {earlier}: lora (seed 1); mini:lr=1e-2:a=8,b=8 (seed 1)" in report

    # resumed with the same --reuse: every run is on disk or in the file, nothing trains
    again = compare(tiny_model_dir, instruction_file, out, SWEPT, "1,2", "--reuse", earlier)
    assert again.returncode == 0, again.stderr
    assert started(again.stdout) == []


def test_a_method_the_file_lacks_is_trained(earlier, tiny_model_dir, instruction_file, tmp_path):
    out = tmp_path / "more"
    result = compare(tiny_model_dir, instruction_file, out, "lora,lora:r=2:lr=1e-2", "1", "--reuse", earlier)
    assert result.returncode == 0, result.stderr
    assert started(result.stdout) == ["lora:r=2:lr=1e-2 seed 1"]
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert methods["lora"]["reused_from"] == str(earlier) and "reused_from" not in methods["lora:r=2:lr=1e-2"]
    assert methods["lora:r=2:lr=1e-2"]["runs"]["1"]["status"] == "ok"


def test_the_results_of_another_setting_are_refused_before_anything_is_written(
    earlier, tiny_model_dir, instruction_file, tmp_path
):
    out = tmp_path / "other"
    result = compare(tiny_model_dir, instruction_file, out, SWEPT, "1", "--warmup", "1", "--reuse", earlier)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lorakit: error: --reuse {earlier} holds a comparison with another setting: warmup (0 there, 1 here); "
        "reuse only the results of the same flags"
    ]
    assert not out.exists()


SETTING = {"steps": 4, "lr": 1e-3}


def _results(tmp_path, entry, sweep_steps=2, name="results.json"):
    path = tmp_path / name
    path.write_text(
        json.dumps(
            {"setting": SETTING, "sweep": {"steps": sweep_steps, "max_extensions": 3}, "methods": {"lora": entry}}
        )
    )
    return str(path)


def _entry(**changes):
    runs = {
        "1": {"status": "ok", "final_eval_loss": 2.0},
        "2": {"status": "diverged"},
        "3": {"status": "failed", "error": "out of memory"},
        "4": {"status": "pending"},
    }
    entry = {
        "lr": 1e-2,
        "lr_sweep": {"0.001": 3.0, "0.01": 2.5},
        "lr_sweep_grid": [1e-3, 1e-2],
        "lr_sweep_extended": [],
        "lr_at_sweep_edge": True,
        "lr_sweep_finished": True,
        "runs": runs,
    }
    return {**entry, **changes}


def test_only_ended_runs_are_taken(tmp_path):
    reused = ReusedResults([_results(tmp_path, _entry())], SETTING, 2, 3).method("lora", [1e-3, 1e-2], 1e-3)
    assert reused.lr == 1e-2
    assert reused.sweep() == {
        "lr": 1e-2,
        "losses": {"0.001": 3.0, "0.01": 2.5},
        "grid": [1e-3, 1e-2],
        "extended": [],
        "at_edge": True,
        "finished": True,
        "pending": False,
    }
    assert reused.run(1)["final_eval_loss"] == 2.0 and reused.run(2)["status"] == "diverged"
    assert reused.run(3) is None and reused.run(4) is None and reused.run(5) is None


@pytest.mark.parametrize(
    "entry, sweep_steps, grid, lr",
    [
        (_entry(lr_sweep_finished=False, lr=None), 2, [1e-3, 1e-2], 1e-3),  # its sweep had not finished
        (_entry(), 2, [1e-3, 3e-3, 1e-2], 1e-3),  # another grid
        (_entry(), 5, [1e-3, 1e-2], 1e-3),  # other sweep steps
        (_entry(), 2, None, 1e-3),  # swept there, a fixed rate here
        (_entry(lr_sweep_grid=None, lr_sweep=None, lr=1e-2), 2, None, 1e-3),  # another fixed rate
    ],
)
def test_a_method_with_another_learning_rate_plan_is_not_taken(tmp_path, entry, sweep_steps, grid, lr):
    assert ReusedResults([_results(tmp_path, entry, sweep_steps)], SETTING, 2, 3).method("lora", grid, lr) is None


def test_a_fixed_rate_method_is_taken_at_the_same_rate(tmp_path):
    entry = _entry(lr_sweep_grid=None, lr_sweep=None, lr=1e-3)
    reused = ReusedResults([_results(tmp_path, entry)], SETTING, 2, 3).method("lora", None, 1e-3)
    assert reused.sweep() is None and reused.run(1)["status"] == "ok"


def test_the_first_file_that_holds_the_method_wins(tmp_path):
    first = _results(tmp_path, _entry(lr_sweep_finished=False, lr=None), name="a.json")  # not usable
    second = _results(tmp_path, _entry(), name="b.json")
    reused = ReusedResults([first, second], SETTING, 2, 3).method("lora", [1e-3, 1e-2], 1e-3)
    assert reused.source == second and reused.run(1)["reused_from"] == second


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file; give the results.json of an earlier comparison"),
        ("{not json", "could not be read as JSON (JSONDecodeError)"),
        ('{"methods": {}}', "is not a comparison's results.json"),
        ('{"setting": {"steps": 8, "lr": 0.001}, "methods": {}}', "another setting: steps (8 there, 4 here);"),
    ],
)
def test_unreadable_or_foreign_files_are_refused(tmp_path, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        ReusedResults([str(path)], SETTING, 2, 3)


def test_report_only_from_reused_results_alone(earlier, tiny_model_dir, instruction_file, tmp_path):
    """A fresh clone: no run directories, only the committed results.json. --report-only writes its report from it,
    trains nothing, and lists the seeds it does not hold as pending."""
    out = tmp_path / "fresh"
    result = compare(tiny_model_dir, instruction_file, out, SWEPT, "1,2", "--reuse", earlier, "--report-only")
    assert result.returncode == 0, result.stderr
    assert started(result.stdout) == [] and not (out / "runs").exists() and not (out / "sweep").exists()
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert all(m["runs"]["1"]["status"] == "ok" and m["runs"]["2"]["status"] == "pending" for m in methods.values())
    assert "**Partial report**: 2 of 4 runs have finished" in (out / "report.md").read_text()
