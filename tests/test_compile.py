"""torch.compile: every method's adapted model compiles as ONE graph (fullgraph=True: a graph break is an error) and
computes the eager loss and gradients.

On the 2 shared CPU cores these were written on, inductor took 40-120 s per method (C++ kernels; 121 s for the first,
with a cold cache), so every method runs under `aot_eager` (Dynamo's capture and AOTAutograd's tracing of forward and
backward, where graph breaks and untraceable code show; its kernels are eager ones: loss and gradients equal eager's,
measured 0), and LoRA under `inductor` too, whose generated kernels change the arithmetic (measured: loss 4.8e-7 from
eager, one float32 ulp of a loss of ~4.6; gradients 6e-8). The file: 116 s there (inductor's cache warm), hence slow.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_config, perturb_adapters, tiny_llama

import lorakit

METHODS = ["lora", "olora", "mini-orthonormal", "loraxs", "melora", "prolora", "mora", "lorta"]
CASES = [(variant, "aot_eager") for variant in METHODS] + [("lora", "inductor")]
GRAD_TOLERANCE = {"aot_eager": 0.0, "inductor": 1e-6}


@pytest.mark.slow
@pytest.mark.parametrize("variant, backend", CASES, ids=[f"{v}-{b}" for v, b in CASES])
def test_an_adapted_model_compiles_in_one_graph_with_the_eager_loss(variant, backend):
    """Training mode: the loss within 5e-7 of eager (fp32), and the trained parameters' gradients too (measured under
    aot_eager: 0 for every method)."""
    model = lorakit.adapt(tiny_llama(), make_config(variant))
    perturb_adapters(model)  # B = 0 would hide the adapter path
    params = list(lorakit.inject.trainable_parameters(model))
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    eager = model(input_ids=ids, labels=ids).loss
    eager_grads = torch.autograd.grad(eager, params)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # raises at the first graph break
    loss = compiled(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params)
    worst = max((grad - expected).abs().max().item() for grad, expected in zip(grads, eager_grads))
    print(f"{variant} {backend}: |loss - eager| {abs(loss.item() - eager.item()):.2e}, max |grad - eager| {worst:.2e}")
    assert abs(loss.item() - eager.item()) <= 5e-7, (loss.item(), eager.item())
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected, atol=GRAD_TOLERANCE[backend], rtol=0)
