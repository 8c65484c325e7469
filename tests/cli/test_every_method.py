"""Every registered method through the user-facing commands: train with --option, inspect, export, compare with
inline options. (The numerical contract of each method is in tests/test_contract.py and tests/methods/.)"""

from __future__ import annotations

import json

import pytest

import lorakit
from lorakit.cli import main
from lorakit.methods import METHODS
from lorakit.models import load_model
from lorakit.training import TrainConfig, train

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
# method -> (train settings, whether PEFT export is possible)
SETTINGS = {
    "lora": (dict(), True),
    "olora": (dict(), True),
    "mini": (dict(mini_a=8, mini_b=8), True),
    "loraxs": (dict(option=["r_init=normal"]), True),
    "melora": (dict(option=["blocks=4"]), True),
    "prolora": (dict(option=["unshared=1", "share_a=2", "share_b=2"]), True),
    "mora": (dict(option=["kind=rope"]), False),  # high rank: not a LoRA
    "lorta": (dict(targets=ATTENTION), True),
}


def test_every_registered_method_is_covered_here():
    assert set(SETTINGS) == set(METHODS)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, instruction_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("every-method")
    for method, (settings, _) in SETTINGS.items():
        cfg = TrainConfig(
            out=str(root / method),
            model=str(tiny_model_dir),
            data=str(instruction_file),
            method=method,
            rank=4,
            steps=2,
            batch_size=2,
            max_length=64,
            lr=1e-2,
            quiet=True,
            **settings,
        )
        train(cfg)
    return root


@pytest.mark.parametrize("method", list(SETTINGS))
def test_train_summary_inspect_and_export(method, runs, tiny_model_dir, tmp_path, capsys):
    settings, exportable = SETTINGS[method]
    adapter = runs / method / "adapter"
    model = lorakit.load_adapter(load_model(str(tiny_model_dir))[0], adapter)  # strict base check
    summary = lorakit.summary(model)
    recorded = json.loads((runs / method / "summary.json").read_text())
    assert summary.method == method and summary.trainable == recorded["trainable_parameters"] > 0
    for item in settings.get("option", []):  # the options reached the adapter
        key, value = item.split("=")
        layer = next(layer for _, layer in lorakit.adapter_layers(model))
        assert str(layer.config.option(key)) == value
    assert main(["inspect", str(adapter)]) == 0
    shown = capsys.readouterr().out
    assert f"method:      {method}" in shown and f"{recorded['trainable_parameters']:,} trainable" in shown
    for item in settings.get("option", []):
        key, value = item.split("=")
        assert f'"{key}": ' in shown
    out = tmp_path / "peft"
    code = main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--format", "peft", "--out", str(out)])
    err = capsys.readouterr().err
    if exportable:
        assert code == 0 and (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1 and "lorakit merge" in err, err
        assert not out.exists() or not any(out.iterdir())


def test_compare_takes_inline_method_options_and_procedures(tiny_model_dir, instruction_file, tmp_path, capsys):
    methods = "melora:blocks=4,mora:kind=sharing,prolora:unshared=2,loraxs,lora:procedure=flat/rho=0.1"
    code = main(
        [
            "compare",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(instruction_file),
            "--methods",
            methods,
            "--rank",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "64",
            "--seeds",
            "1",
            "--quiet",
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert set(results["methods"]) == {
        "melora:blocks=4",
        "mora:kind=sharing",
        "prolora:unshared=2",
        "loraxs",
        "lora:procedure=flat/rho=0.1",
    }
    assert all(entry["finished_runs"] == 1 for entry in results["methods"].values())
    run_json = json.loads((tmp_path / "cmp" / "runs" / "melora_blocks=4" / "seed-1" / "run.json").read_text())
    assert run_json["config"]["option"] == ["blocks=4"]
    flat = json.loads((tmp_path / "cmp" / "runs" / "lora_procedure=flat_rho=0.1" / "seed-1" / "summary.json").read_text())
    assert flat["procedure"] == "flat:rho=0.1"
