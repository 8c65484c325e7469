"""The CLI end to end on a tiny model: train -> adapter -> eval / generate / merge / export / inspect."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lorakit

LORAKIT = [sys.executable, "-m", "lorakit"]


def run(*args, check=True):
    result = subprocess.run(LORAKIT + [str(a) for a in args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"lorakit {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained(tiny_model_dir, instruction_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run(
        "train",
        "--model",
        tiny_model_dir,
        "--data",
        instruction_file,
        "--method",
        "olora",
        "--rank",
        "4",
        "--steps",
        "5",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--max-length",
        "64",
        "--quiet",
        "--out",
        out,
    )
    (out / "stdout.txt").write_text(result.stdout)
    return out


def test_train_prints_summary_and_writes_adapter(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["method"] == "olora" and (trained / "adapter" / "adapter.safetensors").is_file()
    printed = (trained / "stdout.txt").read_text().strip().splitlines()[-1]
    loss = summary["final_train_loss"] if summary["final_eval_loss"] is None else summary["final_eval_loss"]
    assert printed == (
        f"done: 5 steps, final {'train' if summary['final_eval_loss'] is None else 'eval'} loss {loss:.4f}, "
        f"{summary['trainable_parameters']:,} trainable parameters, adapter {summary['adapter_bytes']:,} bytes -> "
        f"{trained / 'adapter'}"
    )


def test_eval_reports_loss_perplexity_and_exact_match(trained, tiny_model_dir, instruction_file):
    result = json.loads(
        run(
            "eval",
            "--model",
            tiny_model_dir,
            "--adapter",
            trained / "adapter",
            "--data",
            instruction_file,
            "--exact-match",
            "2",
        ).stdout
    )
    assert result["eval_loss"] > 0 and result["eval_perplexity"] == pytest.approx(2.718281828 ** result["eval_loss"])
    assert 0 <= result["exact_match"] <= 1 and result["exact_match_examples"] == 2
    base = json.loads(run("eval", "--model", tiny_model_dir, "--data", instruction_file).stdout)
    # the adapter is really applied: 5 steps at lr 1e-2 on this very data lower its loss clearly
    assert result["eval_loss"] < base["eval_loss"] - 0.05, (result, base)
    assert result["examples"] == base["examples"]


def test_generate_runs_with_and_without_adapter(trained, tiny_model_dir):
    with_adapter = run(
        "generate",
        "--model",
        tiny_model_dir,
        "--adapter",
        trained / "adapter",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "5",
    )
    base = run("generate", "--model", tiny_model_dir, "--prompt", "hi", "--max-new-tokens", "5")
    assert with_adapter.returncode == base.returncode == 0
    assert len(with_adapter.stdout) > 1 and len(base.stdout) > 1  # something was generated
    assert with_adapter.stdout != base.stdout  # the trained adapter changes what the model says


def test_merge_writes_a_transformers_model_equal_to_the_adapted_one(trained, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run("merge", "--model", tiny_model_dir, "--adapter", trained / "adapter", "--out", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), trained / "adapter")
    inputs = torch.arange(10).reshape(1, 10)
    torch.testing.assert_close(merged(inputs).logits, adapted(inputs).logits, atol=1e-5, rtol=1e-5)
    again = run(
        "merge", "--model", tmp_path / "merged", "--adapter", trained / "adapter", "--out", tmp_path / "m2", check=False
    )
    assert again.returncode == 2 and "already merged" in again.stderr and not (tmp_path / "m2").exists()


def test_export_peft_loads_in_peft(trained, tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    run(
        "export",
        "--model",
        tiny_model_dir,
        "--adapter",
        trained / "adapter",
        "--format",
        "peft",
        "--out",
        tmp_path / "peft",
    )
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft")
    ours = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), trained / "adapter")
    inputs = torch.arange(10).reshape(1, 10)
    torch.testing.assert_close(theirs.eval()(inputs).logits, ours.eval()(inputs).logits, atol=1e-4, rtol=1e-4)


def test_inspect_shows_method_params_size_and_fingerprint(trained):
    text = run("inspect", trained / "adapter").stdout
    for expected in (
        "method:      olora",
        "parameters:",
        "file size:",
        "fingerprint: 14 modules",
        "weight fingerprint",
    ):
        assert expected in text


def test_help_is_complete_with_defaults():
    text = run("train", "--help").stdout
    for flag in (
        "--model",
        "--data",
        "--method",
        "--rank",
        "--alpha",
        "--targets",
        "--mini-a",
        "--mini-b",
        "--mini-outer",
        "--steps",
        "--batch-size",
        "--lr",
        "--max-length",
        "--grad-accum",
        "--warmup",
        "--seed",
        "--eval-data",
        "--eval-every",
        "--save-every",
        "--resume",
        "--out",
        "--report-to",
    ):
        assert flag in text, flag
    assert "(default: smollm2-135m)" in text and "(default: 16)" in text
    for command in ("eval", "generate", "merge", "export", "inspect", "compare"):
        assert run(command, "--help").returncode == 0


def test_python_dash_m_and_console_script_agree(trained):
    from pathlib import Path

    script = str(Path(sys.executable).with_name("lorakit"))  # the console script this venv installed
    assert Path(script).is_file()
    for args in (["--version"], ["inspect", str(trained / "adapter")]):
        via_script = subprocess.run([script, *args], capture_output=True, text=True)
        via_module = subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True)
        assert via_script.returncode == via_module.returncode == 0, (via_script.stderr, via_module.stderr)
        assert via_script.stdout == via_module.stdout and via_script.stdout.strip()
    assert via_script.stdout != run("--version").stdout
    assert run("--version").stdout.strip() == f"lorakit {lorakit.__version__}"


def test_inspect_lists_per_module_ranks(tmp_path, capsys):
    from conftest import tiny_llama

    from lorakit.cli import main

    model = tiny_llama()
    layers = {}
    for rank, targets in ((2, ["q_proj"]), (6, ["v_proj"])):
        layers.update(lorakit.inject.build_layers(model, lorakit.AdapterConfig(r=rank, targets=targets)))
    lorakit.inject.install(model, layers)
    lorakit.save_adapter(model, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    total = sum(layer.r for layer in layers.values())
    assert f"ranks:       per module, 2 to 6, total {total}" in text
    for name, layer in layers.items():  # every module is listed with its rank
        assert f"  {name}  {layer.in_features} -> {layer.out_features}  r={layer.r}  " in text


@pytest.mark.parametrize(
    ("raised", "code", "words"),
    [
        (KeyboardInterrupt(), 130, "lorakit: interrupted; a run with --save-every continues with --resume"),
        ("user errors only", 2, "lorakit: error: 2 of 4 runs failed (first: lora seed 1: bad flag)"),
        ("one crash", 1, "lorakit: error: 2 of 4 runs failed (first: lora seed 1: bad flag)"),
    ],
)
def test_interrupt_and_failed_comparisons_exit_with_their_documented_codes(raised, code, words, monkeypatch, capsys):
    """docs/errors.md: Ctrl-C exits 130; a compare whose failed runs were all user errors (children exited 2) exits 2,
    else 1."""
    from pathlib import Path

    from lorakit import cli, commands
    from lorakit.compare import RunsFailed

    if isinstance(raised, str):
        second = 2 if raised == "user errors only" else 1
        failed = [("lora", 1, {"error": "bad flag", "exit_code": 2}), ("mini", 2, {"error": "x", "exit_code": second})]
        raised = RunsFailed(failed, 4, Path("report.md"))

    def command(args):
        raise raised

    monkeypatch.setattr(commands, "run_inspect", command)
    assert cli.main(["inspect", "anywhere"]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(words)


def test_lorakits_own_warnings_print_as_one_line(monkeypatch):
    """On the CLI a lorakit warning reads `lorakit: warning: ...` (one line, like its errors); a warning of another
    library keeps Python's format, naming its file."""
    import warnings

    from lorakit import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    cli._quiet_libraries()
    ours = warnings.formatwarning("bf16 is\nemulated here", UserWarning, str(cli.PACKAGE_DIR / "training" / "x.py"), 7)
    assert ours == "lorakit: warning: bf16 is emulated here\n"
    theirs = warnings.formatwarning("deprecated", UserWarning, "/site-packages/other/mod.py", 3)
    assert theirs.startswith("/site-packages/other/mod.py:3: UserWarning: deprecated")
