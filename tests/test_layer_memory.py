"""The adapter path under a half-precision base keeps the bf16 activation for backward, not a float32 copy, and
computes the same values and gradients."""

import pytest
import torch

import lorakit
from lorakit.layer import UpcastProjection
from tests.conftest import VOCAB, tiny_llama


def saved_bytes(fn):
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_projection_equals_autograd_of_the_upcast(dtype):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 32, generator=gen).to(dtype).requires_grad_()
    a = torch.randn(4, 32, generator=gen).requires_grad_()
    grad = torch.randn(3, 7, 4, generator=gen)
    ours, ours_bytes = saved_bytes(lambda: UpcastProjection.apply(h, a))
    ours.backward(grad)
    ours_grads = (h.grad.clone(), a.grad.clone())
    h.grad = a.grad = None
    plain, plain_bytes = saved_bytes(lambda: h.to(a.dtype) @ a.T)
    plain.backward(grad)
    assert torch.equal(ours, plain)
    assert torch.equal(ours_grads[0], h.grad) and torch.allclose(ours_grads[1], a.grad, rtol=1e-6, atol=1e-6)
    assert ours_bytes < plain_bytes  # the float32 copy of h (4 bytes/element) is not kept; h itself (2) is
    assert plain_bytes - ours_bytes == h.numel() * 4 - h.numel() * 2


def test_bf16_model_trains_through_it():
    model = tiny_llama().to(torch.bfloat16)
    lorakit.adapt(model, lorakit.AdapterConfig(r=4))
    model.train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, _ = saved_bytes(lambda: model(input_ids=ids).logits)
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
