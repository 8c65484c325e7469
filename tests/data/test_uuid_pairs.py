"""`uuid-pairs`: MoRA's memorisation task: deterministic pairs of distinct random UUIDs, eval = train, and a compare
over it reports exact match."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid

import pytest

from lorakit.data import default_eval_source, read_records, uuid_pairs
from lorakit.errors import DataError

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_pairs_are_deterministic_distinct_version_4_uuids():
    pairs = uuid_pairs.generate(500, seed=3)
    assert pairs == uuid_pairs.generate(500, seed=3)
    assert pairs != uuid_pairs.generate(500, seed=4)
    values = [v for p in pairs for v in (p["instruction"], p["output"])]
    assert len(set(values)) == 1000
    assert all(UUID4.fullmatch(v) and uuid.UUID(v).version == 4 for v in values)
    assert set(pairs[0]) == {"instruction", "output"}  # the key is the whole prompt; no input
    assert uuid_pairs.generate(100, seed=3) == pairs[:100]  # a smaller n is a prefix


def test_eval_is_the_training_set():
    assert read_records("uuid-pairs:n=32,seed=1", split="eval") == read_records("uuid-pairs:n=32,seed=1")
    assert uuid_pairs.SPLITS_ARE_THE_SAME
    assert default_eval_source("uuid-pairs:n=32") == "uuid-pairs:n=32"


def test_options_and_defaults():
    assert uuid_pairs.parse_options("") == (uuid_pairs.DEFAULT_PAIRS, uuid_pairs.DEFAULT_SEED) == (10_000, 0)
    assert uuid_pairs.parse_options("n=64,seed=2") == uuid_pairs.parse_options("seed=2:n=64") == (64, 2)
    assert len(read_records("uuid-pairs")) == 10_000
    assert read_records("uuid-pairs:n=8") == uuid_pairs.generate(8, 0)


@pytest.mark.parametrize(
    "options,message",
    [("n=0", "out of range"), ("n=x", "not an integer"), ("size=3", "unknown"), ("seed=-1", "negative")],
)
def test_bad_options_give_one_line(options, message):
    with pytest.raises(DataError, match=message) as error:
        read_records(f"uuid-pairs:{options}")
    assert "\n" not in str(error.value)


def test_compare_plans_exact_match_for_recall_data_only():
    from lorakit.cli import build_parser
    from lorakit.compare import EXACT_MATCH_DEFAULT_LIMIT, _exact_match_plan
    from lorakit.training.run_config import TrainConfig

    args = build_parser().parse_args(["compare", "--out", "x"])
    plan = _exact_match_plan(args, TrainConfig(data="uuid-pairs:n=8", eval_data="uuid-pairs:n=8"))
    assert plan == ("uuid-pairs:n=8", 8)
    big = _exact_match_plan(args, TrainConfig(data="uuid-pairs", eval_data="uuid-pairs"))
    assert big == ("uuid-pairs", EXACT_MATCH_DEFAULT_LIMIT)
    assert _exact_match_plan(args, TrainConfig(data="stdlib-docstrings")) == (None, 0)
    args.exact_match = 0  # what a future `lorakit compare --exact-match 0` would set
    assert _exact_match_plan(args, TrainConfig(data="uuid-pairs:n=8", eval_data="uuid-pairs:n=8")) == (None, 0)


def test_compare_on_uuid_pairs_reports_exact_match(tiny_model_dir, tmp_path):
    out = tmp_path / "cmp"
    args = [
        "compare", "--model", tiny_model_dir, "--data", "uuid-pairs:n=4", "--methods", "lora", "--seeds", "1",
        "--steps", "2", "--rank", "4", "--lr", "1e-2", "--max-length", "96", "--eval-every", "1", "--quiet",
        "--out", out,
    ]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["setting"]["eval_data"] == "uuid-pairs:n=4"  # evaluated on its own (= training) pairs
    assert results["exact_match"] == {"data": "uuid-pairs:n=4", "examples": 4}
    run = results["methods"]["lora"]["runs"]["1"]
    assert run["exact_match_examples"] == 4 and 0.0 <= run["exact_match"] <= 1.0
    assert [s for s, _ in run["eval_curve"]] == [0, 1, 2] and [s for s, _ in run["time_curve"]] == [0, 1, 2]
    assert run["time_curve"][0] == [0, 0.0] and run["time_curve"][2][1] > 0
    assert results["methods"]["lora"]["mean"]["exact_match"] == run["exact_match"]
    report = (out / "report.md").read_text()
    assert "exact match |" in report and "first 4 examples of uuid-pairs:n=4" in report
    assert (out / "runs" / "lora" / "seed-1" / "exact_match.json").is_file()
