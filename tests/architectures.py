"""Tiny random models of the architectures people fine-tune, built from transformers config classes (no download).

Each factory takes the vocabulary size (the CLI tests give the tokenizer's) and a seed; sizes are hidden 32,
2 layers, so a forward takes milliseconds. `ARCHITECTURES` maps a short name to (factory, what it exercises).
"""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 64
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=128)
DECODER = COMMON | dict(num_attention_heads=4, num_key_value_heads=2)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the tiny vocabulary (defaults are not)


def _build(model_cls, config_cls, seed: int, **config):
    torch.manual_seed(seed)
    return model_cls(config_cls(**config)).eval()


def llama(vocab_size=VOCAB, seed=0, **kw):
    return _build(tf.LlamaForCausalLM, tf.LlamaConfig, seed, vocab_size=vocab_size, **DECODER | kw)


def qwen2(vocab_size=VOCAB, seed=0, **kw):  # q/k/v with biases
    return _build(tf.Qwen2ForCausalLM, tf.Qwen2Config, seed, vocab_size=vocab_size, **DECODER | kw)


def qwen3(vocab_size=VOCAB, seed=0, **kw):  # q/k norms; head_dim 16: heads x head_dim (64) != hidden (32)
    return _build(tf.Qwen3ForCausalLM, tf.Qwen3Config, seed, vocab_size=vocab_size, head_dim=16, **DECODER | kw)


def mistral(vocab_size=VOCAB, seed=0, **kw):
    return _build(tf.MistralForCausalLM, tf.MistralConfig, seed, vocab_size=vocab_size, **DECODER | kw)


def gemma2(vocab_size=VOCAB, seed=0, **kw):  # embeddings scaled by sqrt(hidden), logit and attention softcapping
    return _build(tf.Gemma2ForCausalLM, tf.Gemma2Config, seed, vocab_size=vocab_size, head_dim=8, **DECODER | kw)


def gemma3(vocab_size=VOCAB, seed=0, **kw):  # text model: scaled embeddings, q/k norms, sliding + global layers
    layers = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    config = DECODER | dict(vocab_size=vocab_size, head_dim=8) | layers | kw
    return _build(tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, seed, **config)


def phi3(vocab_size=VOCAB, seed=0, **kw):  # fused qkv_proj and gate_up_proj
    return _build(tf.Phi3ForCausalLM, tf.Phi3Config, seed, vocab_size=vocab_size, **DECODER | TOKENS | kw)


def gpt2(vocab_size=VOCAB, seed=0, **kw):  # Conv1D layers, fused c_attn
    config = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128) | TOKENS | kw
    return _build(tf.GPT2LMHeadModel, tf.GPT2Config, seed, **config)


def modernbert(vocab_size=VOCAB, seed=0, **kw):  # encoder, fused Wqkv, GLU Wi
    config = COMMON | dict(num_attention_heads=4, vocab_size=vocab_size, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, cls_token_id=1, sep_token_id=2, global_attn_every_n_layers=2,
                           local_attention=16) | kw
    return _build(tf.ModernBertForMaskedLM, tf.ModernBertConfig, seed, **config)


def bert(vocab_size=VOCAB, seed=0, **kw):
    config = COMMON | dict(num_attention_heads=4, vocab_size=vocab_size) | kw
    return _build(tf.BertForMaskedLM, tf.BertConfig, seed, **config)


def mixtral(vocab_size=VOCAB, seed=0, **kw):  # experts as 3-D parameters (transformers 5: MixtralExperts)
    config = DECODER | dict(vocab_size=vocab_size, num_local_experts=4, num_experts_per_tok=2) | kw
    return _build(tf.MixtralForCausalLM, tf.MixtralConfig, seed, **config)


def qwen3_moe(vocab_size=VOCAB, seed=0, **kw):  # experts as 3-D parameters (Qwen3MoeExperts)
    config = DECODER | dict(vocab_size=vocab_size, head_dim=8, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=24, decoder_sparse_step=1) | kw
    return _build(tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig, seed, **config)


ARCHITECTURES = {
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "mistral": mistral,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "phi3": phi3,
    "gpt2": gpt2,
    "bert": bert,
    "modernbert": modernbert,
    "mixtral": mixtral,
    "qwen3-moe": qwen3_moe,
}
