"""Next-token cross-entropy without keeping the logits for backward.

A causal LM's loss is CE(h·Wᵀ + b, y) over the tokens. Backpropagated the usual way, autograd keeps the float32
logits (tokens x vocabulary: 4 x 256 x 49,152 x 4 bytes = 201 MB on SmolLM2) and their softmax until backward.
When the output head is frozen (every lorakit method leaves it frozen), the only gradient it passes on is the one
for h, and that gradient is known as soon as the loss is:

    ∂/∂h Σ_t CE_t = (softmax(z) − onehot(y))·W,   z = h·Wᵀ + b,

so `FrozenHeadCrossEntropy` computes loss and ∂/∂h in one pass over chunks of tokens (one chunk's logits alive at
a time) and keeps only ∂/∂h (tokens x hidden, 85x smaller than the logits on SmolLM2) for backward, where it is
scaled by the incoming gradient. Same products as the usual forward + backward (no recomputation), equal to
`F.cross_entropy` within float32 rounding (tested to 1e-6). This is the idea of fused linear cross-entropy kernels
(Liger-Kernel; Wijmans et al. 2024, "Cut Your Losses", arXiv 2411.09009), in plain torch.

`token_loss_sum` uses it where it is exact: a transformers causal LM whose output head is a frozen nn.Linear with
nothing applied to its logits after it (no final soft-capping or logit scale), outside FSDP (whose sharded head
weight is gathered only inside the head's own forward). Everywhere else it computes the logits as before.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..data.formats import IGNORE

CHUNK_TOKENS = 128  # one chunk's float32 logits: 128 x 49,152 x 4 bytes = 25 MB on SmolLM2, the one such buffer
# config fields that change the logits after the head: the fused loss would compute another model
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Σ over labelled tokens of CE(h·Wᵀ + b, y), W frozen; saves ∂loss/∂h only (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        flat = hidden.reshape(-1, hidden.shape[-1])
        labels = targets.reshape(-1)
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(flat) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, flat.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = torch.nn.functional.linear(flat[rows], weight, bias).float()
            y = labels[rows]
            valid = y != IGNORE
            safe = torch.where(valid, y, 0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            # log Σ exp z = m + log Σ exp(z − m), m = max z, with exp(z − m) made in place: the logits are the
            # chunk's only vocabulary-sized buffer (torch.logsumexp would allocate a second one)
            peak = logits.amax(dim=-1, keepdim=True)
            shifted_exp = logits.sub_(peak).exp_()
            sums = shifted_exp.sum(dim=-1)
            log_norm = peak.squeeze(1) + sums.log()
            total = total + torch.where(valid, log_norm - picked, 0.0).sum()
            if needs_grad:
                probs = shifted_exp.div_(sums[:, None])  # softmax, in the same buffer
                probs[torch.arange(len(y), device=y.device), safe] -= 1.0
                probs *= valid[:, None]
                grad[rows] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        if needs_grad:
            ctx.save_for_backward(grad)
        ctx.hidden_shape = hidden.shape
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).reshape(ctx.hidden_shape), None, None, None, None


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The output head if the fused loss is exact for this model (see the module docstring), else None."""
    inner = getattr(model, "module", model)  # DDP's wrapper: the head lives on the wrapped model
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or any(p.requires_grad for p in head.parameters()):
        return None
    if type(head.weight) is not torch.Tensor and type(head.weight) is not nn.Parameter:  # DTensor (FSDP), NF4
        return None
    config = getattr(inner, "config", None)
    if config is None or any(getattr(config, field, None) not in (None, 1.0) for field in LOGIT_TRANSFORMS):
        return None
    return head


@contextlib.contextmanager
def head_passthrough(head: nn.Linear):
    """Inside the block the head returns its input: the model's "logits" are its final hidden states."""
    head.forward = lambda hidden: hidden
    try:
        yield
    finally:
        del head.forward


def token_loss_sum(model, batch: dict[str, torch.Tensor], *, full_logits: bool = False) -> torch.Tensor:
    """Sum of next-token cross-entropy over the labelled tokens of a batch (float32).

    `full_logits=True` (CLI `--full-logits`) always computes the whole logits, as transformers does."""
    head = None if full_logits else fused_head(model)
    targets = batch["labels"][:, 1:]
    if head is not None:
        with head_passthrough(head):
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return FrozenHeadCrossEntropy.apply(
            hidden[:, :-1], head.weight, head.bias, targets.to(hidden.device), CHUNK_TOKENS
        )
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.to(shifted.device).reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
