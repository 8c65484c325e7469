"""The fused frozen-head cross-entropy: the loss and every gradient equal the full-logits path, and it never keeps
the logits for backward."""

import pytest
import torch

import lorakit
from lorakit.data.formats import IGNORE
from lorakit.training.loss import CHUNK_TOKENS, FrozenHeadCrossEntropy, fused_head, token_loss_sum
from tests.conftest import tiny_gpt2, tiny_llama


def _batch(rows=3, width=20, vocab=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=gen)
    labels = ids.clone()
    labels[0, :5] = IGNORE  # a prompt
    labels[2, 12:] = IGNORE  # padding
    mask = (labels != IGNORE).long()
    mask[0, :5] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_function_matches_cross_entropy_across_chunks():
    """Loss within 1e-6 relative of F.cross_entropy; the gradient as close to a float64 reference as float32
    F.cross_entropy's own."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 700, 16, generator=gen).requires_grad_()
    weight, bias = torch.randn(300, 16, generator=gen), torch.randn(300, generator=gen)
    targets = torch.randint(0, 300, (2, 700), generator=gen)
    targets[0, :33] = IGNORE
    assert hidden[0].numel() // 16 > CHUNK_TOKENS  # several chunks, the last one partial

    def reference(h, w, b):
        logits = (h @ w.T + b).reshape(-1, 300)
        return torch.nn.functional.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")

    results = {}
    for name, loss_of in (
        ("fused", lambda h: FrozenHeadCrossEntropy.apply(h, weight, bias, targets, CHUNK_TOKENS)),
        ("float32", lambda h: reference(h, weight, bias)),
        ("float64", lambda h: reference(h, weight.double(), bias.double())),
    ):
        h = (hidden.double() if name == "float64" else hidden).detach().requires_grad_()
        loss = loss_of(h)
        (3.0 * loss).backward()
        results[name] = (loss.item(), h.grad.double())
    exact_loss, exact_grad = results["float64"]
    assert abs(results["fused"][0] - results["float32"][0]) <= 1e-6 * abs(results["float32"][0])
    assert abs(results["fused"][0] - exact_loss) <= 1e-6 * abs(exact_loss)
    fused_error = (results["fused"][1] - exact_grad).abs().max().item()
    float32_error = (results["float32"][1] - exact_grad).abs().max().item()
    assert fused_error <= 2 * float32_error + 1e-6, (fused_error, float32_error)


@pytest.mark.parametrize("method", ["lora", "olora", "mini"])
def test_training_loss_and_gradients_equal_full_logits(method):
    model = tiny_llama()
    extra = dict(mini_a=8, mini_b=8) if method == "mini" else {}
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, r=4, **extra))
    model.train()
    assert fused_head(model) is model.lm_head
    grads = []
    for full in (False, True):
        model.zero_grad()
        loss = token_loss_sum(model, _batch(), full_logits=full)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (fused, fused_grads), (full, full_grads) = grads
    assert abs(fused - full) <= 1e-6 * abs(full)
    for a, b in zip(fused_grads, full_grads):  # float32 rounding: 1e-5 of each element, 1e-6 of the tensor's largest
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())
    assert "forward" not in vars(model.lm_head)  # the head's own forward is back after the pass


def test_falls_back_where_the_fused_loss_would_not_be_exact():
    gpt2 = tiny_gpt2()  # Conv1D blocks but an nn.Linear head: fused
    lorakit.adapt(gpt2, lorakit.AdapterConfig(r=4))
    assert fused_head(gpt2) is not None
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert fused_head(capped) is None
    trained_head = tiny_llama()
    lorakit.adapt(trained_head, lorakit.AdapterConfig(r=4, targets=["lm_head"]))
    assert fused_head(trained_head) is None  # the head is an adapter layer now


def test_backward_keeps_no_logits():
    """The saved tensors of the loss are the hidden-state gradient only: no tokens x vocabulary tensor."""
    model = tiny_llama(vocab_size=4096)
    lorakit.adapt(model, lorakit.AdapterConfig(r=4))
    model.train()
    batch = _batch(vocab=4096)
    vocab_sized = []

    def pack(tensor):
        if tensor.dim() >= 1 and tensor.shape[-1] == 4096 and tensor.numel() > 4096 * 32:
            vocab_sized.append(tuple(tensor.shape))
        return tensor

    for full in (True, False):
        vocab_sized.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_loss_sum(model, batch, full_logits=full).backward()
        if full:
            assert vocab_sized, "the full-logits path should save logits (the check would be vacuous)"
        else:
            assert vocab_sized == []
