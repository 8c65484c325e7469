"""Regeneration is pinned: a change of generator would silently break every saved LoRA-Mini adapter."""

from __future__ import annotations

import torch

from lorakit import random as lk_random


def test_pinned_orthonormal_values():
    gen = lk_random.generator(0, "model.layers.0.self_attn.q_proj", "A_out")
    a_out = lk_random.orthonormal_columns(576, 32, gen).T
    assert a_out.shape == (32, 576)
    assert PINNED_ORTHONORMAL == [round(v, 6) for v in a_out[0, :4].tolist() + a_out[31, -2:].tolist()]


def test_pinned_normal_and_kaiming_values():
    normal = lk_random.gaussian(32, 576, lk_random.generator(1, "model.layers.3.mlp.up_proj", "A_out"))
    kaiming = lk_random.kaiming_uniform(16, 32, lk_random.generator(1, "model.layers.3.mlp.up_proj", "A_in"))
    assert PINNED_NORMAL == [round(v, 6) for v in normal[0, :3].tolist()]
    assert PINNED_KAIMING == [round(v, 6) for v in kaiming[0, :3].tolist()]


def test_same_inputs_same_bits():
    first = lk_random.orthonormal_columns(100, 10, lk_random.generator(5, "x", "B_out"))
    second = lk_random.orthonormal_columns(100, 10, lk_random.generator(5, "x", "B_out"))
    assert torch.equal(first, second)


PINNED_ORTHONORMAL = [0.039279, -0.009779, 0.000131, 0.018204, 0.032598, 0.026979]
PINNED_NORMAL = [-0.995179, -0.278573, 1.167304]
PINNED_KAIMING = [-0.010101, -0.048066, 0.102506]
