"""LoRA-XS specifics: r² trained parameters, ΔW inside W's top-r singular subspaces, the accuracy of both SVD paths,
a hand-computed update, R's inits and options, recomputation on load in a fresh process, PEFT export, GPT-2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import fresh_copy, model_output, perturb_adapters, tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit.methods import loraxs
from lorakit.methods.loraxs import top_singular

TESTS = Path(__file__).resolve().parents[1]
LANCZOS_LLAMA = dict(hidden_size=320, intermediate_size=640, num_hidden_layers=1)  # every min(in, out) > 256 but k/v


def xs(**kwargs) -> lorakit.AdapterConfig:
    return lorakit.AdapterConfig(method="loraxs", **{"r": 4, **kwargs})


def sin_largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sine of the largest principal angle between the spans of two matrices with orthonormal columns."""
    a, b = a.double(), b.double()
    return torch.linalg.matrix_norm(a - b @ (b.T @ a), ord=2).item()


def spectrum_matrix(m: int, n: int, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(σ) Vᵀ with random orthonormal U, V, rounded to float32 (the exact SVD in the tests is of the result)."""
    gen = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    return ((u * singular_values) @ v.T).float()


@pytest.fixture
def lanczos_runs(monkeypatch):
    """Records each call of the iterative path: True if it converged, False if it fell back to the dense SVD."""
    runs, original = [], loraxs._block_lanczos

    def spy(w, r):
        result = original(w, r)
        runs.append(result is not None)
        return result

    monkeypatch.setattr(loraxs, "_block_lanczos", spy)
    return runs


def test_trains_r_squared_parameters_per_layer():
    model = lorakit.adapt(tiny_llama(), xs(r=4))
    layers = list(lorakit.adapter_layers(model))
    assert len(layers) == 14
    for name, layer in layers:
        assert {k: p.numel() for k, p in layer.trainable_parameters().items()} == {"R": 16}, name
    assert lorakit.summary(model).trainable == 14 * 16
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 14 * 16


def test_delta_lies_in_the_top_r_singular_subspaces():
    base = tiny_llama()
    model = lorakit.adapt(fresh_copy(base), xs(r=4, alpha=8))
    perturb_adapters(model)
    for name, layer in lorakit.adapter_layers(model):
        u, _, vh = torch.linalg.svd(base.get_submodule(name).weight.double())
        u, v = u[:, :4], vh[:4].T
        delta = layer.delta_weight().double()
        size = delta.norm()
        assert size > 1e-3, name
        assert (delta - u @ (u.T @ delta)).norm() / size < 1e-5, name  # column space ⊂ span(U_r)
        assert (delta - (delta @ v) @ v.T).norm() / size < 1e-5, name  # row space ⊂ span(V_r)
        ranks = torch.linalg.svdvals(delta)
        assert ranks[4] / ranks[0] < 1e-6, name  # rank ≤ r


@pytest.mark.parametrize("r", [1, 4, 16])
def test_dense_path_matches_the_exact_subspaces_on_a_random_64x64_weight(r, lanczos_runs):
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    u0, s0, vh0 = torch.linalg.svd(w.double())
    u, s, v = top_singular(w, r)
    assert lanczos_runs == []  # small: the dense path
    assert sin_largest_angle(u, u0[:, :r]) <= 1e-4 and sin_largest_angle(v, vh0[:r].T) <= 1e-4
    torch.testing.assert_close(s, s0[:r], rtol=1e-6, atol=0)


SPECTRA = {
    "slow decay": lambda: spectrum_matrix(512, 1536, torch.arange(1, 513, dtype=torch.float64) ** -0.5),
    # σ_17 = σ_16 (1 − 1e-5) (LLM weights have gaps near 1e-4): float32 round-off mixes u_16 and u_17, so a float32
    # SVD misses by 3e-3 and Ritz vectors from float32 products by 3e-4 (hence lorakit's float64 refinement)
    "tiny gap at r": lambda: spectrum_matrix(
        512, 1536, (torch.arange(1, 513, dtype=torch.float64) ** -0.5).index_fill(0, torch.tensor([16]), 0.25 - 2.5e-6)
    ),
    "gaussian": lambda: torch.randn(512, 1536, generator=torch.Generator().manual_seed(0)),  # flat top spectrum
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_iterative_path_matches_the_exact_subspaces(spectrum, lanczos_runs):
    w = SPECTRA[spectrum]()
    u0, s0, vh0 = torch.linalg.svd(w.double(), full_matrices=False)
    for target, r in ((w, 16), (w.T, 16), (w, 3)):  # both orientations; r below the block size
        u, s, v = top_singular(target, r)
        exact_u, exact_v = (u0, vh0.T) if target is w else (vh0.T, u0)
        assert sin_largest_angle(u, exact_u[:, :r]) <= 1e-4, (spectrum, r)
        assert sin_largest_angle(v, exact_v[:, :r]) <= 1e-4, (spectrum, r)
        torch.testing.assert_close(s, s0[:r], rtol=1e-6, atol=0)
    assert len(lanczos_runs) == 3
    if spectrum != "gaussian":  # the flat Gaussian spectrum may fall back to the dense SVD; the others must not
        assert all(lanczos_runs)


def test_signs_are_canonical():
    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    u, s, v = top_singular(w, 5)
    u2, _, v2 = top_singular(-w, 5)  # flips every singular pair: the canonical signs must undo it
    torch.testing.assert_close(u2, u)
    torch.testing.assert_close(v2, -v)
    rows = u.abs().argmax(0)
    assert (u[rows, torch.arange(5)] > 0).all()
    torch.testing.assert_close((u * s) @ v.T, w.double() - _tail(w, 5), atol=1e-10, rtol=0)


def _tail(w, r):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, r:] * s[r:]) @ vh[r:]


class TwoByThree(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=False)
        with torch.no_grad():  # SVD by hand: σ1 = 3, u1 = e2, v1 = e1;  σ2 = 2, u2 = e1, v2 = e3
            self.proj.weight.copy_(torch.tensor([[0.0, 0.0, 2.0], [3.0, 0.0, 0.0]]))


def test_delta_weight_equals_a_hand_computed_update():
    model = lorakit.adapt(TwoByThree(), xs(r=2, alpha=4))  # s = 4 / 2 = 2
    layer = model.proj
    torch.testing.assert_close(layer.U, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(layer.S, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(layer.SVt, torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    with torch.no_grad():
        layer.R.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    # R Σ = [[3, 4], [9, 8]];  U R Σ swaps its rows: [[9, 8], [3, 4]];  · Vᵀ puts columns on inputs 1 and 3;  · s = 2
    expected = torch.tensor([[18.0, 0.0, 16.0], [6.0, 0.0, 8.0]])
    torch.testing.assert_close(layer.delta_weight(), expected)
    x = torch.tensor([[1.0, 1.0, 1.0]])  # W x = (2, 3), ΔW x = (34, 14)
    torch.testing.assert_close(model.proj(x), torch.tensor([[36.0, 17.0]]))


def test_zero_init_keeps_the_output_and_gives_r_a_gradient(inputs):
    base = tiny_llama()
    model = lorakit.adapt(fresh_copy(base), xs())
    layers = [layer for _, layer in lorakit.adapter_layers(model)]
    assert all(torch.equal(layer.R, torch.zeros(4, 4)) for layer in layers)
    out = model_output(model, inputs)
    assert torch.equal(out, model_output(base, inputs))
    out.square().mean().backward()
    assert all(layer.R.grad is not None and layer.R.grad.abs().max() > 0 for layer in layers)


def test_normal_init_draws_the_authors_std_reproducibly():
    base = tiny_llama(hidden_size=64, intermediate_size=128)
    draw = lambda seed: lorakit.adapt(fresh_copy(base), xs(r=16, seed=seed, extra={"r_init": "normal"}))  # noqa: E731
    values = torch.cat([layer.R.detach().flatten() for _, layer in lorakit.adapter_layers(draw(0))])
    assert values.numel() == 14 * 256
    assert abs(values.std().item() / 1e-5 - 1) < 0.05  # ±5% at 3,584 samples is over 4 standard errors
    assert abs(values.mean().item()) < 1e-6
    again = torch.cat([layer.R.detach().flatten() for _, layer in lorakit.adapter_layers(draw(0))])
    other = torch.cat([layer.R.detach().flatten() for _, layer in lorakit.adapter_layers(draw(1))])
    assert torch.equal(values, again) and not torch.equal(values, other)


@pytest.mark.parametrize(
    ("extra", "key"), [({"r_init": "bad"}, "r_init"), ({"r_init": 3}, "r_init"), ({"init": "normal"}, "'init'")]
)
def test_invalid_options_are_one_line_errors_naming_the_key(extra, key):
    with pytest.raises(lorakit.ConfigError) as error:
        lorakit.AdapterConfig(method="loraxs", extra=extra)
    message = str(error.value)
    assert key in message and "\n" not in message


def test_rank_above_the_smaller_side_is_refused_before_the_model_is_touched():
    model = tiny_llama()  # k_proj and v_proj map 32 -> 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.ConfigError, match=r"k_proj \(32 -> 16\).*r <= 16") as error:
        lorakit.adapt(model, xs(r=17))
    assert "\n" not in str(error.value)
    assert not list(lorakit.adapter_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_only_r_is_stored_and_the_factors_are_not_in_the_state_dict(tmp_path):
    from safetensors import safe_open

    model = lorakit.adapt(tiny_llama(), xs())
    lorakit.save_adapter(model, tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter.safetensors", "pt") as handle:
        assert {key.rsplit(".", 1)[-1] for key in handle.keys()} == {"R"}
    assert not [key for key in model.state_dict() if key.endswith((".U", ".S", ".SVt"))]


def test_fresh_process_with_another_thread_count_recomputes_equal_factors(tmp_path, lanczos_runs):
    """Only R is saved: a new process (other thread count, so other float32 round-off) rebuilds U_r, Σ_r V_rᵀ from
    the base, on the dense path (tiny Llama) and on the iterative one (width 320)."""
    inputs = torch.arange(12).reshape(2, 6) % 64
    expected = {}
    for label, overrides in (("dense", {}), ("lanczos", LANCZOS_LLAMA)):
        base = tiny_llama(**overrides)
        model = lorakit.adapt(fresh_copy(base), xs())
        perturb_adapters(model)
        lorakit.save_adapter(model, tmp_path / label)
        expected[label] = model_output(model, inputs)
        assert (expected[label] - model_output(base, inputs)).abs().max() > 1e-3  # the adapter matters
    assert len(lanczos_runs) == 5 and all(lanczos_runs)  # q, o, gate, up, down of the wide model
    threads = 2 if torch.get_num_threads() == 1 else 1
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        torch.set_num_threads({threads})
        from conftest import tiny_llama
        from safetensors.torch import save_file
        import lorakit
        logits = {{}}
        for label, overrides in (("dense", {{}}), ("lanczos", {LANCZOS_LLAMA!r})):
            model = lorakit.load_adapter(tiny_llama(**overrides), {str(tmp_path)!r} + "/" + label)
            logits[label] = model(torch.arange(12).reshape(2, 6) % 64).logits.detach().contiguous()
        save_file(logits, {str(tmp_path / "out.safetensors")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "out.safetensors")
    for label, logits in expected.items():
        torch.testing.assert_close(loaded[label], logits, atol=1e-5, rtol=0, msg=label)


def test_peft_export_is_a_rank_r_lora_with_equal_logits(tmp_path, inputs):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = lorakit.adapt(fresh_copy(base), xs(alpha=8))
    perturb_adapters(model)
    expected = model_output(model, inputs)
    lorakit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {} and config["lora_alpha"] == 8
    loaded = peft.PeftModel.from_pretrained(fresh_copy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(model_output(loaded, inputs), expected, atol=1e-4, rtol=1e-4)


def test_gpt2_conv1d_unchanged_at_init_and_delta_in_the_singular_subspaces(inputs):
    base = tiny_gpt2()
    model = lorakit.adapt(fresh_copy(base), xs())
    assert torch.equal(model_output(model, inputs), model_output(base, inputs))
    perturb_adapters(model)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        layer = model.get_submodule(name)
        weight = base.get_submodule(name).weight.double()  # Conv1D: in x out
        p, _, qh = torch.linalg.svd(weight, full_matrices=False)  # W_linear = Wᵀ: U_r = Q_r, V_r = P_r
        p, q = p[:, :4], qh[:4].T
        assert sin_largest_angle(layer.U, q) < 1e-6 and sin_largest_angle(layer.SVt.T, p) < 1e-6
        delta = layer.delta_weight().double()  # in the Conv1D layout, in x out
        assert delta.shape == weight.shape and delta.norm() > 1e-3
        assert (delta - p @ (p.T @ delta)).norm() / delta.norm() < 1e-5
        assert (delta - (delta @ q) @ q.T).norm() / delta.norm() < 1e-5
