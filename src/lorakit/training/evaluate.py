"""Evaluation: mean next-token loss and perplexity over labelled tokens; exact match for instruction data."""

from __future__ import annotations

import math

import torch

from ..data.formats import IGNORE
from .batches import collate
from .loss import token_loss_sum


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], batch_size: int, pad_id: int, device, accelerator=None) -> dict:
    """Token-weighted mean loss over `examples` (sharded across processes when an accelerator is given)."""
    was_training = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shard = examples[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(shard), batch_size):
        batch = {k: v.to(device) for k, v in collate(shard[start : start + batch_size], pad_id).items()}
        total[0] += token_loss_sum(model, batch).double()
        total[1] += (batch["labels"][:, 1:] != IGNORE).sum()
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    loss = (total[0] / total[1].clamp_min(1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(total[1].item())}


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int = 64) -> float:
    """Fraction of instruction records whose greedy answer equals the reference output (whitespace-stripped)."""
    from ..data.formats import instruction_prompt

    model.eval()
    hits = 0
    for record in records:
        answer = generate(model, tokenizer, instruction_prompt(record), max_new_tokens=max_new_tokens)
        hits += answer.strip() == record["output"].strip()
    return hits / max(len(records), 1)


@torch.no_grad()
def _prompt_text(tokenizer, prompt: str) -> str:
    if tokenizer.chat_template:
        from ..data.formats import apply_chat_template

        return apply_chat_template(
            tokenizer, [{"role": "user", "content": prompt}], "--prompt", add_generation_prompt=True
        )
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy completion of a user prompt (through the chat template when the tokenizer has one)."""
    encoded = tokenizer(_prompt_text(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    output = model.generate(
        **{k: v.to(device) for k, v in encoded.items()},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def generate_batch(model, tokenizer, prompts: list[str], adapter_names: list[str], max_new_tokens: int = 64):
    """Greedy completions of many prompts in one batch, row i with adapter `adapter_names[i]` ("base": none):
    left-padded, one `generate` call (a mixed batch, `lorakit.routing`)."""
    texts = [_prompt_text(tokenizer, prompt) for prompt in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        encoded = tokenizer(texts, return_tensors="pt", add_special_tokens=False, padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    model.eval()
    from ..inject import is_adapted

    kwargs = {"adapter_names": adapter_names} if is_adapted(model) else {}
    output = model.generate(
        **{k: v.to(device) for k, v in encoded.items()},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    start = encoded["input_ids"].shape[1]
    return [tokenizer.decode(row[start:], skip_special_tokens=True) for row in output]
