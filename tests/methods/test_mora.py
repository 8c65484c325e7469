"""MoRA specifics (arXiv 2405.12130; authors' code kongds/MoRA, peft-mora/src/peft/tuners/lora/layer.py,
`update_layer`, `_apply_mora`, `get_delta_weight`): r̂ and the parameter count, the rank of ΔW for both kinds,
hand-computed ΔW, an independent loop reference of the authors' compression / decompression (padding, truncation,
tiling, r̂ >= in), init, alpha, PEFT export, merge, option validation and Conv1D."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import fresh_copy, model_output, perturb_adapters, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.fingerprint import Fingerprint
from lorakit.methods.mora import MoraLayer

KINDS = ("rope", "sharing")


def expected_rank(in_features, out_features, r, kind):
    """r̂ = int(√((in + out)·r) + 0.5) as in the authors' `update_layer`; rounded down to even for RoPE."""
    rank = int(math.sqrt((in_features + out_features) * r) + 0.5)
    return rank - rank % 2 if kind == "rope" else rank


def mora_layer(in_features, out_features, r, kind, *, seed=0, dtype=torch.float64):
    """A standalone MoRA layer on a random nn.Linear, with a random (trained-looking) M."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=False, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen, dtype=dtype))
    config = lorakit.AdapterConfig(method="mora", r=r, extra={"kind": kind})
    # the fingerprint is given: Fingerprint.of cannot read a float64 weight (vector_norm(..., dtype=float32) refuses)
    layer = MoraLayer(base, config, "layer", fingerprint=Fingerprint.of(base.weight.float()))
    with torch.no_grad():
        layer.M.copy_(torch.randn(layer.M.shape, generator=gen, dtype=dtype))
    return layer


def set_m(layer, values):
    with torch.no_grad():
        layer.M.copy_(torch.tensor(values, dtype=layer.M.dtype))


# --------------------------------------------------------------------------------------------- the reference
def reference_update(x, m, in_features, out_features, kind):
    """The authors' algorithm written out chunk by chunk (`_apply_mora`, types 1 and 6).

    x is padded by wrapping around (they concatenate x[..., :pad]; here x is concatenated as often as needed, so
    r̂ >= in, where their `view` fails, gets the intended x_pad[i] = x[i mod in]), cut into n = ⌈in/r̂⌉ chunks.
    sharing: the chunks are summed and multiplied by M, the r̂ outputs repeated and truncated to out.
    rope: chunk c is rotated by RoPE at position c (inv_freq_j = 1/10000^(2j/r̂), angles [f, f], rotate_half
    [−x_hi, x_lo]), multiplied by M; the n·r̂ outputs are concatenated, truncated to out, or repeated when shorter.
    Every chunk is computed (lorakit skips those truncated away).
    """
    rank = m.shape[0]
    chunks = math.ceil(in_features / rank)
    padded = x
    while padded.shape[-1] < chunks * rank:
        padded = torch.cat([padded, x], dim=-1)
    pieces = [padded[..., c * rank : (c + 1) * rank] for c in range(chunks)]
    if kind == "sharing":
        total = pieces[0]
        for piece in pieces[1:]:
            total = total + piece
        y = total @ m.T
    else:
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rank, 2, dtype=torch.float64) / rank))
        outputs = []
        for c, piece in enumerate(pieces):
            angles = torch.cat([c * inv_freq, c * inv_freq]).to(x.dtype)
            rotated_half = torch.cat([-piece[..., rank // 2 :], piece[..., : rank // 2]], dim=-1)
            outputs.append((piece * angles.cos() + rotated_half * angles.sin()) @ m.T)
        y = torch.cat(outputs, dim=-1)
    tiled = y
    while tiled.shape[-1] < out_features:
        tiled = torch.cat([tiled, y], dim=-1)
    return tiled[..., :out_features]


def reference_delta(layer):
    """Dense ΔW (out x in) of the reference: the update of each basis vector is a column."""
    eye = torch.eye(layer.in_features, dtype=layer.M.dtype)
    return reference_update(eye, layer.M.detach(), layer.in_features, layer.out_features, layer.kind).T


def authors_apply_mora(x, m, in_f, out_f, kind):
    """A transcription of the authors' vectorised `_apply_mora` (types 1 and 6), valid only where r̂ < in."""
    r = m.shape[0]
    sum_inter = in_f // r
    if in_f % r != 0:
        x = torch.cat([x, x[..., : r - in_f % r]], dim=-1)
        sum_inter += 1
    in_x = x.view(*x.shape[:-1], sum_inter, r)
    if kind == "sharing":
        out_x = in_x.sum(dim=-2) @ m.T
        repeat_time = out_f // r + (out_f % r != 0)
        return torch.cat([out_x] * repeat_time, dim=-1)[..., :out_f]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    freqs = torch.outer(torch.arange(sum_inter), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().unsqueeze(0).to(x.dtype), emb.sin().unsqueeze(0).to(x.dtype)
    rh_in_x = torch.cat((-in_x[..., r // 2 :], in_x[..., : r // 2]), dim=-1)
    out_x = ((in_x * cos + rh_in_x * sin) @ m.T).reshape(*x.shape[:-1], -1)[..., :out_f]
    if out_x.shape[-1] < out_f:
        repeat_time = out_f // out_x.shape[-1] + (out_f % out_x.shape[-1] != 0)
        out_x = torch.cat([out_x] * repeat_time, dim=-1)[..., :out_f]
    return out_x


# (in, out, r): in = out, in > out (truncation), in < out (tiling), r̂ not dividing in (padding), r̂ >= in (wrap
# more than once), and the tiny Llama's shapes
SHAPES = [
    (8, 8, 1),  # r̂ 4, in = out, two chunks
    (12, 6, 1),  # r̂ 4: in > out, truncated (rope skips the third chunk)
    (13, 5, 1),  # r̂ 4: in > out and padding
    (6, 12, 1),  # r̂ 4: in < out, tiled, padding
    (10, 10, 1),  # r̂ 4: padding wraps 2 features
    (40, 24, 2),  # r̂ 11 (rope 10)
    (24, 40, 2),
    (3, 13, 2),  # r̂ 6 >= in = 3: wraps twice
    (2, 30, 1),  # r̂ 6 (sharing) / 6 (rope) >= in = 2: wraps three times
    (32, 16, 4),  # tiny Llama k_proj
    (48, 32, 4),  # tiny Llama down_proj
]


# --------------------------------------------------------------------------------------------- 1. counts
R_HAT_R8 = {  # (in, out) of the tiny Llama -> r̂ at r=8 for sharing (rope: rounded down to even)
    (32, 32): 23,  # √512 = 22.63 -> 23 (rounding to nearest, not ⌊·⌋)
    (32, 16): 20,  # √384 = 19.60
    (32, 48): 25,  # √640 = 25.30
    (48, 32): 25,
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", [4, 8])
def test_trained_parameter_count_is_r_hat_squared(kind, r):
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(method="mora", r=r, extra={"kind": kind}))
    layers = dict(lorakit.adapter_layers(model))
    assert len(layers) == 14
    shapes = {(layer.in_features, layer.out_features) for layer in layers.values()}
    assert {(32, 16), (32, 48), (48, 32), (32, 32)} <= shapes  # out < in, out > in and square
    total = 0
    for name, layer in layers.items():
        rank = expected_rank(layer.in_features, layer.out_features, r, kind)
        if r == 8:
            table = R_HAT_R8[(layer.in_features, layer.out_features)]
            assert rank == (table - table % 2 if kind == "rope" else table)
        params = layer.trainable_parameters()
        assert list(params) == ["M"], name
        assert params["M"].shape == (rank, rank), name
        assert layer.rank_hat == rank, name
        if kind == "rope":
            assert rank % 2 == 0, name
        total += rank * rank
    assert lorakit.summary(model).trainable == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == total


def test_only_m_is_stored():
    layer = mora_layer(24, 40, 2, "rope")
    assert set(layer.state_dict()) == {"M"}  # index and cos/sin tables are not persistent; the host owns the base
    assert MoraLayer.stored_shapes(layer.config, 24, 40) == {"M": (10, 10)}


# --------------------------------------------------------------------------------------------- 2. rank
@pytest.mark.parametrize("shape", [(32, 32, 4), (32, 16, 4), (32, 48, 4), (48, 32, 4), (40, 24, 2), (24, 40, 2)])
def test_rope_update_has_full_rank(shape):
    layer = mora_layer(*shape, "rope", seed=5)
    delta = layer.delta_weight().double()
    full = min(layer.in_features, layer.out_features)
    assert torch.linalg.matrix_rank(delta).item() == full
    assert full > layer.rank_hat  # the point of MoRA: more than r̂ (and than LoRA's r)


@pytest.mark.parametrize("shape", [(32, 32, 4), (32, 16, 4), (32, 48, 4), (48, 32, 4), (40, 24, 2), (24, 40, 2)])
def test_sharing_update_has_rank_at_most_r_hat(shape):
    layer = mora_layer(*shape, "sharing", seed=5)
    rank = torch.linalg.matrix_rank(layer.delta_weight().double()).item()
    assert rank <= layer.rank_hat
    assert rank == min(layer.rank_hat, layer.in_features, layer.out_features)  # generic M: exactly that


# --------------------------------------------------------------------------------------------- 3. by hand
def test_sharing_by_hand_padding_and_tiling():
    # in=4, out=6, r=1: r̂ = int(√10 + 0.5) = 3. x_pad = [x0 x1 x2 | x3 x0 x1]; summed: [x0+x3, x1+x0, x2+x1]
    # (rows of C: [1 0 0 1], [1 1 0 0], [0 1 1 0]); y = M·s; out = [y0 y1 y2 y0 y1 y2].
    layer = mora_layer(4, 6, 1, "sharing")
    assert layer.rank_hat == 3
    set_m(layer, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    # row k of M·C = M[k,0]·[1 0 0 1] + M[k,1]·[1 1 0 0] + M[k,2]·[0 1 1 0]
    rows = [[3, 5, 3, 1], [9, 11, 6, 4], [15, 17, 9, 7]]
    expected = torch.tensor(rows + rows, dtype=torch.float64)
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-12, rtol=0)


def test_sharing_by_hand_truncation():
    # in=4, out=2, r=1: r̂ = int(√6 + 0.5) = 2. Chunks [x0 x1], [x2 x3] summed: [x0+x2, x1+x3]; y = M·s (2 = out).
    layer = mora_layer(4, 2, 1, "sharing")
    assert layer.rank_hat == 2
    set_m(layer, [[1, 2], [3, 4]])
    expected = torch.tensor([[1, 2, 1, 2], [3, 4, 3, 4]], dtype=torch.float64)
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-12, rtol=0)


def test_rope_by_hand_r_hat_2():
    # in=out=4, r=1: int(√8 + 0.5) = 3, rounded down to even: r̂ = 2. inv_freq = 10000^0 = 1: chunk 0 is at
    # position 0 (no rotation), chunk 1 at position 1 (angle 1 rad). rotate_half([a, b]) = [−b, a], so
    # RoPE_1 [a, b] = [a·cos1 − b·sin1, b·cos1 + a·sin1] = R·[a, b] with R = [[c, −s], [s, c]]. ΔW = diag(M, M·R).
    layer = mora_layer(4, 4, 1, "rope")
    assert layer.rank_hat == 2
    set_m(layer, [[1, 2], [3, 4]])
    c, s = math.cos(1.0), math.sin(1.0)
    m_r = [[1 * c + 2 * s, -1 * s + 2 * c], [3 * c + 4 * s, -3 * s + 4 * c]]  # M·R
    expected = torch.tensor(
        [[1, 2, 0, 0], [3, 4, 0, 0], [0, 0, m_r[0][0], m_r[0][1]], [0, 0, m_r[1][0], m_r[1][1]]], dtype=torch.float64
    )
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-12, rtol=0)


def test_rope_by_hand_r_hat_4_frequencies_and_half_layout():
    # in=out=8, r=1: r̂ = int(√16 + 0.5) = 4. inv_freq = [10000^0, 10000^(-2/4)] = [1, 0.01], angles at position 1
    # [1, 0.01, 1, 0.01]; rotate_half pairs feature j with j + 2 (the HF layout, not adjacent pairs):
    # R·[a, b, c, d] = [a·c1 − c·s1, b·c2 − d·s2, c·c1 + a·s1, d·c2 + b·s2]. ΔW = diag(M, M·R); M = I shows R.
    layer = mora_layer(8, 8, 1, "rope")
    assert layer.rank_hat == 4
    set_m(layer, torch.eye(4).tolist())
    c1, s1, c2, s2 = math.cos(1.0), math.sin(1.0), math.cos(0.01), math.sin(0.01)
    rotation = torch.tensor(
        [[c1, 0, -s1, 0], [0, c2, 0, -s2], [s1, 0, c1, 0], [0, s2, 0, c2]],
        dtype=torch.float64,
    )
    expected = torch.zeros(8, 8, dtype=torch.float64)
    expected[:4, :4] = torch.eye(4)
    expected[4:, 4:] = rotation
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-12, rtol=0)


def test_rope_by_hand_padding_wraps_around():
    # in=5, out=7, r=1: int(√12 + 0.5) = 3 -> r̂ = 2, chunks [x0 x1] [x2 x3] [x4 x0] at positions 0, 1, 2 (angles 0, 1, 2 rad);
    # y = [M·x01, M·R1·x23, M·R2·[x4, x0]] (6 values), tiled to 7: y6 = y0.
    layer = mora_layer(5, 7, 1, "rope")
    assert layer.rank_hat == 2
    set_m(layer, torch.eye(2).tolist())

    def rot(angle):
        c, s = math.cos(angle), math.sin(angle)
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)

    expected = torch.zeros(7, 5, dtype=torch.float64)
    expected[0:2, 0:2] = torch.eye(2)
    expected[2:4, 2:4] = rot(1.0)
    expected[4:6, 4] = rot(2.0)[:, 0]  # x4 is the first element of chunk 2
    expected[4:6, 0] = rot(2.0)[:, 1]  # x0 wrapped around is the second
    expected[6] = expected[0]  # tiled with period n·r̂ = 6
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------- 4. reference
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{i}-{o}-r{r}" for i, o, r in SHAPES])
def test_forward_equals_loop_reference(kind, shape):
    layer = mora_layer(*shape, kind, seed=2)
    in_features, out_features, _ = shape
    x = torch.randn(2, 3, in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = layer.base_layer(x) + reference_update(x, layer.M.detach(), in_features, out_features, kind)
    torch.testing.assert_close(layer(x), want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(layer.delta_weight(), reference_delta(layer), atol=1e-10, rtol=1e-10)


AUTHORS_SHAPES = [s for s in SHAPES if expected_rank(*s, "sharing") < s[0]]  # their code fails for r̂ >= in


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", AUTHORS_SHAPES, ids=[f"{i}-{o}-r{r}" for i, o, r in AUTHORS_SHAPES])
def test_loop_reference_equals_authors_vectorised_code(kind, shape):
    """Where the authors' code runs (r̂ < in), the loop reference above is their `_apply_mora`."""
    in_features, out_features, r = shape
    rank = expected_rank(in_features, out_features, r, kind)
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(rank, rank, dtype=torch.float64, generator=gen)
    x = torch.randn(4, in_features, dtype=torch.float64, generator=gen)
    ours = reference_update(x, m, in_features, out_features, kind)
    theirs = authors_apply_mora(x, m, in_features, out_features, kind)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # their cos/sin tables are float32


def test_r_hat_at_least_in_wraps_more_than_once():
    # in=2, out=30, r=1: r̂ = int(√32 + 0.5) = 6 for both kinds. sharing: x_pad = [x0 x1 x0 x1 x0 x1] is one chunk.
    layer = mora_layer(2, 30, 1, "sharing")
    assert layer.rank_hat == 6
    set_m(layer, torch.eye(6).tolist())
    expected = torch.tensor([[1, 0], [0, 1]] * 15, dtype=torch.float64)
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-12, rtol=0)
    rope = mora_layer(2, 30, 1, "rope")
    set_m(rope, torch.eye(6).tolist())  # one chunk at position 0: no rotation, same ΔW
    torch.testing.assert_close(rope.delta_weight(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_and_unbatched_inputs(kind):
    layer = mora_layer(10, 14, 1, kind)
    x = torch.randn(10, 5, dtype=torch.float64).T  # (5, 10) with strides (1, 5)
    assert not x.is_contiguous()
    want = layer.base_layer(x) + reference_update(x, layer.M.detach(), 10, 14, kind)
    torch.testing.assert_close(layer(x), want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(layer(x[0]), want[0], atol=1e-10, rtol=1e-10)  # no leading dimension


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_m_in_float32(kind, dtype, inputs):
    base = tiny_llama().to(dtype)
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="mora", r=4, extra={"kind": kind}))
    assert torch.equal(model_output(model, inputs), model_output(base, inputs))
    perturb_adapters(model)
    layer = model.get_submodule("model.layers.0.mlp.gate_proj")
    assert layer.M.dtype == torch.float32
    x = torch.randn(3, 32).to(dtype)
    want = layer.base_layer(x).float() + reference_update(x.float(), layer.M.detach(), 32, 48, kind)
    torch.testing.assert_close(layer(x).float(), want, atol=0.05, rtol=0.02)
    assert layer(x).dtype == dtype


def test_dropout_applies_to_the_update_only():
    layer = mora_layer(10, 14, 1, "rope")
    layer.dropout = nn.Dropout(0.5)
    layer.train()
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.manual_seed(0)
    got = layer(x)
    torch.manual_seed(0)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    want = layer.base_layer(x) + reference_update(dropped, layer.M.detach(), 10, 14, "rope")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------------------------- 5. init
@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_output_unchanged_and_m_gets_gradient(kind, inputs):
    base = tiny_llama()
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="mora", r=4, extra={"kind": kind}))
    for name, layer in lorakit.adapter_layers(model):
        assert torch.count_nonzero(layer.M) == 0, name
        assert torch.count_nonzero(layer.delta_weight()) == 0, name
    assert torch.equal(model_output(model, inputs), model_output(base, inputs))
    model_output(model, inputs).square().mean().backward()
    for name, layer in lorakit.adapter_layers(model):
        assert layer.M.grad is not None and layer.M.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------- 6. alpha
def test_alpha_and_rslora_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"alpha=32") as caught:
        config = lorakit.AdapterConfig(method="mora", r=4, alpha=32)
    assert caught[0].filename == __file__  # the warning points at the caller, not at dataclass internals
    with pytest.warns(UserWarning, match="rslora"):
        lorakit.AdapterConfig(method="mora", r=4, rslora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = lorakit.AdapterConfig(method="mora", r=4)  # alpha defaults to r: nothing to warn about
    base = tiny_llama()
    scaled = lorakit.adapt(fresh_copy(base), config)
    unscaled = lorakit.adapt(fresh_copy(base), plain)
    perturb_adapters(scaled)
    perturb_adapters(unscaled)
    for (name, a), (_, b) in zip(lorakit.adapter_layers(scaled), lorakit.adapter_layers(unscaled)):
        assert a.scale == 1.0 and b.scale == 1.0, name
        torch.testing.assert_close(a.delta_weight(), b.delta_weight(), atol=0, rtol=0)
        assert a.delta_weight().abs().max() > 0, name


# --------------------------------------------------------------------------------------------- 7. export
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_sharing_exports_as_exact_lora_that_peft_loads(factory, tmp_path, inputs):
    peft = pytest.importorskip("peft")
    base = factory()
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="mora", r=4, extra={"kind": "sharing"}))
    perturb_adapters(model)
    for name, layer in lorakit.adapter_layers(model):
        a, b = layer.export_factors()
        assert a.shape == (layer.rank_hat, layer.in_features) and b.shape == (layer.out_features, layer.rank_hat)
        torch.testing.assert_close(b @ a, layer.delta_linear(), atol=1e-6, rtol=1e-6, msg=name)
    expected = model_output(model, inputs)
    lorakit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ranks = {layer.rank_hat for _, layer in lorakit.adapter_layers(model)}
    assert config["r"] in ranks and len(ranks) > 1 and config["rank_pattern"]  # per-module r̂ via rank_pattern
    loaded = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-4, rtol=1e-4)


def test_rope_export_is_refused_pointing_to_merge(tmp_path):
    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(method="mora", r=4))
    perturb_adapters(model)
    assert all(layer.export_factors() is None for _, layer in lorakit.adapter_layers(model))
    with pytest.raises(lorakit.ConfigError, match="lorakit merge") as raised:
        lorakit.export_peft(model, tmp_path / "peft")
    message = str(raised.value)
    assert "\n" not in message and "mora" in message
    assert not (tmp_path / "peft").exists()
    (tmp_path / "existing").mkdir()
    with pytest.raises(lorakit.ConfigError, match="lorakit merge"):
        lorakit.export_peft(model, tmp_path / "existing")
    assert list((tmp_path / "existing").iterdir()) == []


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_keeps_kind(kind, tmp_path, inputs):
    base = tiny_llama()
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="mora", r=4, extra={"kind": kind}))
    perturb_adapters(model)
    expected = model_output(model, inputs)
    lorakit.save_adapter(model, tmp_path / "adapter")
    loaded = lorakit.load_adapter(fresh_copy(base), tmp_path / "adapter")
    assert {layer.kind for _, layer in lorakit.adapter_layers(loaded)} == {kind}
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- 8. merge
@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_forward_with_uneven_shapes(kind, inputs):
    # hidden 24, intermediate 40, kv 12, r=2: q 24->24 (r̂ 10, padding), k/v 24->12 (r̂ 8, truncation), gate/up
    # 24->40 (r̂ 10 rope: padding and tiling), down 40->24 (truncation of whole chunks)
    base = tiny_llama(hidden_size=24, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2)
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="mora", r=2, extra={"kind": kind}))
    perturb_adapters(model)
    layers = dict(lorakit.adapter_layers(model))
    assert any(layer.in_features % layer.rank_hat for layer in layers.values())
    assert any(layer.in_features > layer.out_features for layer in layers.values())
    assert any(layer.in_features < layer.out_features for layer in layers.values())
    for name, layer in layers.items():
        torch.testing.assert_close(layer.delta_weight(), reference_delta(layer).float(), atol=1e-6, rtol=1e-5, msg=name)
    unmerged = model_output(model, inputs)
    assert not torch.allclose(unmerged, model_output(base, inputs), atol=1e-3)
    lorakit.merge(model)
    torch.testing.assert_close(model_output(model, inputs), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{i}-{o}-r{r}" for i, o, r in SHAPES])
def test_layer_merge_equals_forward(kind, shape):
    layer = mora_layer(*shape, kind, seed=4)
    x = torch.randn(5, shape[0], dtype=torch.float64)
    adapted = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), adapted, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(layer.base_layer(x), adapted, atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------------------------- 9. options
def test_invalid_kind_is_a_one_line_config_error():
    with pytest.raises(lorakit.ConfigError) as raised:
        lorakit.AdapterConfig(method="mora", extra={"kind": "bad"})
    message = str(raised.value)
    assert "kind" in message and "bad" in message and "rope" in message and "sharing" in message
    assert "\n" not in message
    with pytest.raises(lorakit.ConfigError, match="kinds") as raised:
        lorakit.AdapterConfig(method="mora", extra={"kinds": "rope"})
    assert "\n" not in str(raised.value)


def test_rope_refuses_r_hat_below_two():
    config = lorakit.AdapterConfig(method="mora", r=1)
    with pytest.raises(lorakit.ConfigError, match="kind=sharing") as raised:
        MoraLayer.check_layer(config, "tiny", 1, 1)  # int(√2 + 0.5) = 1 -> 0 after rounding down to even
    assert "\n" not in str(raised.value)
    MoraLayer.check_layer(lorakit.AdapterConfig(method="mora", r=1, extra={"kind": "sharing"}), "tiny", 1, 1)


# --------------------------------------------------------------------------------------------- 10. GPT-2
@pytest.mark.parametrize("kind", KINDS)
def test_gpt2_conv1d(kind, inputs):
    base = tiny_gpt2()
    model = lorakit.adapt(fresh_copy(base), lorakit.AdapterConfig(method="mora", r=4, extra={"kind": kind}))
    layers = dict(lorakit.adapter_layers(model))
    assert {type(layer.base_layer).__name__ for layer in layers.values()} == {"Conv1D"}
    assert {(96, 32), (32, 128), (128, 32)} <= {
        (layer.out_features, layer.in_features) for layer in layers.values()
    }  # c_attn (out > in), c_fc, mlp c_proj (in > out)
    assert torch.equal(model_output(model, inputs), model_output(base, inputs))
    perturb_adapters(model)
    for name, layer in layers.items():
        # Conv1D keeps its weight as in x out: delta_weight is ΔWᵀ
        torch.testing.assert_close(
            layer.delta_weight(), reference_delta(layer).T.float(), atol=1e-6, rtol=1e-5, msg=name
        )
    adapted = model_output(model, inputs)
    assert not torch.allclose(adapted, model_output(base, inputs), atol=1e-3)
    lorakit.merge(model)
    torch.testing.assert_close(model_output(model, inputs), adapted, atol=1e-5, rtol=1e-5)
