"""A tiny Llama model directory with a real (byte-level BPE) tokenizer and chat template, built offline in ~1 s."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "def add(a, b): return a + b",
    "Return the sum of two numbers.",
    "the quick brown fox jumps over the lazy dog",
    "import os\nimport sys\nclass Foo:\n    pass",
    "Write the docstring summary for this function.",
] * 20


def build_tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(path: Path, *, chat_template: bool = True, seed: int = 0, intermediate_size: int = 64) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_instruction_data(path: Path, count: int = 24) -> Path:
    rows = [
        {
            "instruction": f"Summarise item {i}",
            "input": "def add(a, b): return a + b" if i % 2 else "",
            "output": f"Return the sum {i}.",
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_architecture_dir(path: Path, arch: str, *, tokenizer=None, seed: int = 0) -> Path:
    """A model directory of one of tests/architectures.py's tiny models, with `build_tokenizer`'s tokenizer."""
    from architectures import ARCHITECTURES

    tokenizer = tokenizer or build_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    ARCHITECTURES[arch](vocab_size=len(tokenizer), seed=seed, **ids).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
