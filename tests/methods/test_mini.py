"""LoRA-Mini specifics: outer matrices, trainable counts, forward as effective rank-r factors."""

from __future__ import annotations

import torch
from conftest import fresh_copy, model_output, perturb_adapters, tiny_llama

import lorakit


def mini(outer, **kw):
    return lorakit.AdapterConfig(method="mini", r=4, mini_a=8, mini_b=6, mini_outer=outer, **kw)


def test_orthonormal_outer_matrices():
    model = lorakit.adapt(tiny_llama(), mini("orthonormal"))
    for _, layer in lorakit.adapter_layers(model):
        torch.testing.assert_close(layer.A_out @ layer.A_out.T, torch.eye(8), atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.B_out.T @ layer.B_out, torch.eye(6), atol=1e-5, rtol=0)


def test_qr_outer_matrices_span_the_weight():
    base = tiny_llama()
    model = lorakit.adapt(fresh_copy(base), mini("qr"))
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    w = base.get_submodule("model.layers.0.mlp.up_proj").weight
    projector = layer.B_out @ layer.B_out.T  # projects onto span(B_out)
    torch.testing.assert_close(projector @ w[:, :6], w[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.A_out @ layer.A_out.T, torch.eye(8), atol=1e-5, rtol=0)


def test_normal_outer_matrices_are_standard_normal():
    model = lorakit.adapt(tiny_llama(hidden_size=64, intermediate_size=128), mini("normal"))
    values = torch.cat([l.A_out.flatten() for _, l in lorakit.adapter_layers(model)])
    assert abs(values.mean().item()) < 0.05 and abs(values.std().item() - 1) < 0.05


def test_delta_is_the_four_factor_product():
    model = lorakit.adapt(tiny_llama(), mini("orthonormal", alpha=3))
    perturb_adapters(model)
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    expected = (3 / 4) * layer.B_out @ layer.B_in @ layer.A_in @ layer.A_out
    torch.testing.assert_close(layer.delta_weight(), expected)


def test_outer_matrices_are_frozen_buffers_not_parameters(inputs):
    model = lorakit.adapt(tiny_llama(), mini("orthonormal"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith((".A_in", ".B_in")) for n in names)
    buffers = [n for n, _ in model.named_buffers() if n.endswith((".A_out", ".B_out"))]
    assert len(buffers) == 2 * len(list(lorakit.adapter_layers(model)))
    assert model_output(model, inputs).shape[-1] == 64


def test_regenerated_from_seed_and_name_independent_of_order():
    first = lorakit.adapt(tiny_llama(), mini("orthonormal", seed=7))
    second = lorakit.adapt(tiny_llama(seed=99), mini("orthonormal", seed=7, targets=["v_proj"]))
    a = first.get_submodule("model.layers.1.self_attn.v_proj")
    b = second.get_submodule("model.layers.1.self_attn.v_proj")
    assert torch.equal(a.A_out, b.A_out) and torch.equal(a.B_out, b.B_out) and torch.equal(a.A_in, b.A_in)
    other = lorakit.adapt(tiny_llama(), mini("orthonormal", seed=8))
    assert not torch.equal(a.A_out, other.get_submodule("model.layers.1.self_attn.v_proj").A_out)


REGENERATE = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads({threads})
from conftest import tiny_llama
from safetensors.torch import save_file
import lorakit
tensors = {{}}
for outer in ("orthonormal", "normal"):
    config = lorakit.AdapterConfig(method="mini", r=4, mini_a=8, mini_b=8, mini_outer=outer, seed=3)
    for name, layer in lorakit.adapter_layers(lorakit.adapt(tiny_llama(), config)):
        tensors[f"{{outer}}.{{name}}.A_out"] = layer.A_out.contiguous()
        tensors[f"{{outer}}.{{name}}.B_out"] = layer.B_out.contiguous()
save_file(tensors, {path!r})
"""


def test_outer_matrices_are_bit_identical_across_processes_and_thread_counts(tmp_path):
    """The file does not store A_out / B_out: a loader in another process, with another thread count, must draw
    exactly the same bits."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    tests = str(Path(__file__).parents[1])
    drawn = {}
    for threads in (1, 2):
        path = tmp_path / f"threads-{threads}.safetensors"
        script = REGENERATE.format(tests=tests, threads=threads, path=str(path))
        subprocess.run([sys.executable, "-c", script], check=True)
        drawn[threads] = load_file(str(path))
    here = {}
    for outer in ("orthonormal", "normal"):
        config = lorakit.AdapterConfig(method="mini", r=4, mini_a=8, mini_b=8, mini_outer=outer, seed=3)
        for name, layer in lorakit.adapter_layers(lorakit.adapt(tiny_llama(), config)):
            here[f"{outer}.{name}.A_out"], here[f"{outer}.{name}.B_out"] = layer.A_out, layer.B_out
    assert drawn[1].keys() == drawn[2].keys() == here.keys() and len(here) == 2 * 2 * 14  # 2 outer kinds x 14 modules x (A_out, B_out)
    for key, value in here.items():
        assert torch.equal(drawn[1][key], value) and torch.equal(drawn[2][key], value), key
