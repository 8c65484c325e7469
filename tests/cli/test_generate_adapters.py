"""`lorakit generate --adapter NAME=DIR ... --prompts FILE`: several adapters on one base, a mixed batch."""

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
def two_adapters(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters with large, different updates (so their greedy completions differ)."""
    from lorakit.models import load_model

    root = tmp_path_factory.mktemp("served")
    paths = {}
    for name, seed in (("sql", 1), ("poem", 2)):
        model, _ = load_model(str(tiny_model_dir))
        lorakit.adapt(model, lorakit.AdapterConfig(r=4, seed=seed))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in lorakit.adapter_layers(model):
                layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * 2)
        paths[name] = lorakit.save_adapter(model, root / name)
    return paths


def test_mixed_batch_equals_each_prompt_alone(tiny_model_dir, two_adapters, tmp_path):
    requests = [
        {"adapter": "sql", "prompt": "list the tables"},
        {"adapter": "poem", "prompt": "a line about rain"},
        {"adapter": "base", "prompt": "hello"},
        {"adapter": "poem", "prompt": "list the tables"},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in requests) + "\n", encoding="utf-8-sig")  # a BOM is fine
    served = run(
        "generate", "--model", tiny_model_dir, "--adapter", f"sql={two_adapters['sql']}",
        "--adapter", f"poem={two_adapters['poem']}", "--prompts", prompts, "--max-new-tokens", "6",
    )
    lines = [json.loads(line) for line in served.stdout.splitlines()]
    assert [(line["adapter"], line["prompt"]) for line in lines] == [(r["adapter"], r["prompt"]) for r in requests]
    for line in lines:
        adapter = [] if line["adapter"] == "base" else ["--adapter", two_adapters[line["adapter"]]]
        alone = run("generate", "--model", tiny_model_dir, *adapter, "--prompt", line["prompt"],
                    "--max-new-tokens", "6")
        assert line["completion"] == alone.stdout.rstrip("\n")
    assert lines[0]["completion"] != lines[3]["completion"]  # one prompt, two adapters: they differ


@pytest.mark.parametrize(
    ("lines", "adapters", "message"),
    [
        (['{"adapter": "sql", "prompt": "x"}', '{"adapter": "nope", "prompt": "y"}'], ["sql"],
         "prompt 2 names adapter 'nope'; use one of: sql, base"),
        (['{"adapter": "sql"}'], ["sql"], 'prompt 1 needs a "prompt" string'),
        (["not json"], ["sql"], "line 1 is not valid JSON"),
        (['{"prompt": "x"}'], ["sql", "poem"], "prompt 1 names adapter None"),
    ],
)
def test_bad_prompt_files_are_refused_in_one_line(tiny_model_dir, two_adapters, tmp_path, lines, adapters, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    flags = [x for name in adapters for x in ("--adapter", f"{name}={two_adapters[name]}")]
    result = run("generate", "--model", tiny_model_dir, *flags, "--prompts", prompts, check=False)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unnamed_adapters_among_several_are_refused(tiny_model_dir, two_adapters, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    result = run("generate", "--model", tiny_model_dir, "--adapter", two_adapters["sql"],
                 "--adapter", two_adapters["poem"], "--prompts", prompts, check=False)
    assert result.returncode == 2 and "is not NAME=DIR" in result.stderr
