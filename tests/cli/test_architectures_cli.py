"""`lorakit train --model DIR` on every causal architecture of tests/architectures.py, written to disk first.

The CLI's `main` runs in this process (a subprocess per architecture would spend most of its time importing
torch); the global state it sets (warning format and filters, transformers' verbosity) is restored afterwards.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from architectures import ARCHITECTURES
from tiny_assets import build_architecture_dir, build_tokenizer

from lorakit import cli

# the CLI trains causal LMs: BERT would load as BertLMHeadModel (its encoder sees every token, so next-token training
# means nothing) and ModernBERT has no causal head (refused, below)
CAUSAL = [name for name in ARCHITECTURES if name not in ("bert", "modernbert")]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def isolated_cli(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    verbosity = transformers.logging.get_verbosity()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread beats contended ones several times over
    with warnings.catch_warnings():
        yield
    transformers.logging.set_verbosity(verbosity)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", CAUSAL)
def test_train_on_a_model_directory(arch, tokenizer, instruction_file, tmp_path, isolated_cli, capsys):
    build_architecture_dir(tmp_path / "model", arch, tokenizer=tokenizer)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tmp_path / "model"), "--data", str(instruction_file), "--rank", "4", "--steps",
            "3", "--batch-size", "2", "--max-length", "48", "--lr", "1e-2", "--eval-limit", "4", "--quiet",
            "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["trainable_parameters"] > 0
    assert (out / "adapter" / "adapter.safetensors").is_file()
    adapter = json.loads((out / "adapter" / "adapter.json").read_text())
    assert adapter["base_model"]["class"] == type(ARCHITECTURES[arch]()).__name__ and adapter["modules"]


@pytest.mark.parametrize("arch", ["modernbert"])
def test_an_encoder_without_a_causal_head_is_refused_in_one_line(arch, tokenizer, instruction_file, tmp_path,
                                                                  isolated_cli, capsys):
    build_architecture_dir(tmp_path / "model", arch, tokenizer=tokenizer)
    argv = ["train", "--model", str(tmp_path / "model"), "--data", str(instruction_file), "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lorakit: error: model '{tmp_path / 'model'}': it could not be loaded: ")
    assert "AutoModelForCausalLM" in err[-1] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_classification_on_a_model_directory(arch, tokenizer, tmp_path, isolated_cli, capsys):
    """--task classification on every architecture, encoders included: the new head trains in full and eval
    reports its accuracy."""
    build_architecture_dir(tmp_path / "model", arch, tokenizer=tokenizer)
    rows = [{"text": f"{'good' if i % 2 else 'bad'} fox {i}", "label": "pos" if i % 2 else "neg"} for i in range(8)]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    argv = ["train", "--task", "classification", "--model", str(tmp_path / "model"), "--data", str(data),
            "--eval-data", str(data), "--rank", "4", "--steps", "2", "--batch-size", "4", "--max-length", "16",
            "--lr", "1e-2", "--quiet", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classification" and 0.0 <= summary["accuracy"] <= 1.0
    adapter = json.loads((out / "adapter" / "adapter.json").read_text())
    (head,) = adapter["modules_to_save"]
    assert head in ("score", "classifier") and adapter["modules_to_save"][head]["tensors"]["weight"][0] == 2
    assert adapter["modules"] and not any(name.startswith(head) for name in adapter["modules"])
    capsys.readouterr()
    assert cli.main(["eval", "--model", str(tmp_path / "model"), "--adapter", str(out / "adapter"), "--data",
                     str(data), "--max-length", "16"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == pytest.approx(summary["accuracy"])


@pytest.mark.parametrize("arch", ["mixtral", "qwen3-moe"])
def test_train_with_target_parameters_trains_a_lora_per_expert_and_exports_it(arch, tokenizer, instruction_file,
                                                                             tmp_path, isolated_cli, capsys):
    """--target-parameters: a LoRA per expert on the 3-D expert parameters beside --targets; the adapter is saved
    with them, `lorakit eval` loads it, and `lorakit export-peft` writes PEFT's target_parameters."""
    build_architecture_dir(tmp_path / "model", arch, tokenizer=tokenizer)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tmp_path / "model"), "--data", str(instruction_file), "--rank", "2", "--steps",
            "2", "--batch-size", "2", "--max-length", "32", "--lr", "1e-2", "--eval-limit", "2", "--quiet",
            "--targets", "q_proj,v_proj", "--target-parameters", "experts.gate_up_proj,experts.down_proj",
            "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    adapter = json.loads((out / "adapter" / "adapter.json").read_text())
    experts = adapter["target_parameters"]
    assert sorted(experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(entry["parameters"] == ["gate_up_proj", "down_proj"] for entry in experts.values())
    summary = json.loads((out / "summary.json").read_text())
    in_experts = sum(d for entry in experts.values() for shape in entry["tensors"].values() for d in [_numel(shape)])
    assert summary["trainable_parameters"] > in_experts > 0
    export = ["export", "--model", str(tmp_path / "model"), "--adapter", str(out / "adapter"), "--out", str(tmp_path / "peft")]
    assert cli.main(export) == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert len(written["target_parameters"]) == 4 and written["target_modules"] == ["q_proj", "v_proj"]


def _numel(shape):
    count = 1
    for d in shape:
        count *= d
    return count
