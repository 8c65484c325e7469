"""Sequence classification: `lorakit train --task classification` on records with `text` and `label` fields.

The model is the base loaded as `AutoModelForSequenceClassification` (its transformer blocks from the causal LM's
weights; the new head, `score` on Llama / Qwen / GPT-2, `classifier` on BERT, drawn from a fixed seed so that every
load of the base gives the same head and the adapter's base check passes). The head trains in full
(`modules_to_save`), the blocks through the adapters. Loss: mean cross-entropy over examples; eval adds accuracy.
The labels (sorted, as strings) are saved in DIR/adapter/classification.json, which `lorakit eval` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn import functional as F

from ..errors import DataError

LABELS_FILE = "classification.json"
HEAD_NAMES = ("score", "classifier")
HEAD_SEED = 0


def check_records(records: list[dict], source: str) -> None:
    for number, record in enumerate(records, 1):
        text, label = record.get("text"), record.get("label")
        if not isinstance(text, str) or not isinstance(label, str | int) or isinstance(label, bool):
            raise DataError(
                f"{source}: record {number} needs a 'text' string and a 'label' (a string or an integer) for "
                "--task classification"
            )


def labels_of(records: list[dict], source: str) -> list[str]:
    """The sorted distinct labels (as strings) of `text` / `label` records; DataError on a record without them."""
    check_records(records, source)
    labels = sorted({str(r["label"]) for r in records}, key=lambda v: (not v.lstrip("-").isdigit(), _order(v)))
    if len(labels) < 2:
        raise DataError(f"{source}: every record has the label {labels[0]!r}; --task classification needs two or more")
    return labels


def _order(value: str):
    return int(value) if value.lstrip("-").isdigit() else value


def tokenize(records: list[dict], tokenizer, max_length: int, labels: list[str], source: str) -> list[dict]:
    check_records(records, source)
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(r["label"]) for r in records} - set(index))
    if unknown:
        raise DataError(f"{source}: label {unknown[0]!r} is not one of the training labels {labels}")
    return [
        {"input_ids": tokenizer(r["text"], truncation=True, max_length=max_length)["input_ids"] or [0],
         "label": index[str(r["label"])]}
        for r in records
    ]  # fmt: skip


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, : len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}


def loss_sum(model, batch: dict) -> torch.Tensor:
    """Σ over the batch's examples of CE(logits, label)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, device, accelerator=None) -> dict:
    """Mean cross-entropy and accuracy over `examples` (sharded across processes when an accelerator is given)."""
    was_training = model.training
    model.eval()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    shard = examples[rank::world]
    total = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, examples
    for start in range(0, len(shard), batch_size):
        batch = {k: v.to(device) for k, v in collate(shard[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        total[0] += F.cross_entropy(logits, batch["labels"], reduction="sum").double()
        total[1] += (logits.argmax(-1) == batch["labels"]).sum()
        total[2] += len(batch["labels"])
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    count = max(int(total[2].item()), 1)
    return {"eval_loss": total[0].item() / count, "accuracy": total[1].item() / count, "eval_examples": count}


def head_name(model) -> str:
    """The new head's module name (`score`, `classifier`)."""
    names = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in names:
            return name
    raise DataError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def init_head(model) -> None:
    """Draw the new head from a fixed seed (std: the config's initializer_range), the same at every load."""
    gen = torch.Generator().manual_seed(HEAD_SEED)
    std = getattr(model.config, "initializer_range", 0.02)
    head = model.get_submodule(head_name(model))
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.bias is not None:
                    module.bias.zero_()


def init_new_weights(model, missing_keys) -> None:
    """Draw every other weight the checkpoint lacks from a fixed seed too, the same at every load (BERT's pooler
    when the checkpoint is a masked LM, which has none): otherwise transformers draws it afresh at each load, and the
    classifier evaluated or reloaded is not the one trained (the base check refuses it). Matrices
    N(0, initializer_range²), biases 0, vectors (norm weights) 1."""
    head = head_name(model) + "."
    gen = torch.Generator().manual_seed(HEAD_SEED + 1)
    std = getattr(model.config, "initializer_range", 0.02)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in sorted(missing_keys):  # sorted: the same draws at every load
            param = params.get(key)
            if param is None or key.startswith(head) or not param.is_floating_point():
                continue
            if key.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen).to(param.dtype) * std)


def save_labels(adapter_dir: Path, labels: list[str]) -> None:
    from ..atomic import write_json

    write_json(Path(adapter_dir) / LABELS_FILE, {"task": "classification", "labels": labels})


def read_labels(adapter_dir) -> list[str] | None:
    path = Path(adapter_dir) / LABELS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return [str(label) for label in data["labels"]]
