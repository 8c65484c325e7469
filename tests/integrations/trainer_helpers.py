"""Shared pieces of the Trainer / TRL tests: a tiny adapted Llama, token data, quiet CPU TrainingArguments."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import VOCAB, make_config, tiny_llama
from datasets import Dataset
from safetensors import safe_open
from transformers import Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import lorakit
from lorakit.integrations import install_trainer_hooks

hf_logging.set_verbosity_error()

INPUTS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(123))
# Trainer's own files in a checkpoint (beside the model files)
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def adapted(variant: str = "lora", base_seed: int = 0, **overrides):
    """`lorakit.adapt` on the tiny Llama, then `install_trainer_hooks` (a no-op once `lorakit.adapt` calls it)."""
    return install_trainer_hooks(lorakit.adapt(tiny_llama(base_seed), make_config(variant, **overrides)))


def token_data(count: int = 32, length: int = 12, seed: int = 0) -> Dataset:
    ids = torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def arguments(out, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=2,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def train(model, out, *, resume=None, callbacks=None, optimizers=(None, None), data=None, **overrides) -> Trainer:
    trainer = Trainer(
        model=model,
        args=arguments(out, **overrides),
        train_dataset=data if data is not None else token_data(),
        callbacks=callbacks,
        optimizers=optimizers,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def trained(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the adapted model (adapter factors, LoRTA's shared ones), copied."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(INPUTS).logits


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys())


def model_files(directory: Path) -> dict[str, int]:
    """Every file of a saved directory except the Trainer's own, with its size."""
    return {p.name: p.stat().st_size for p in Path(directory).iterdir() if p.is_file() and p.name not in TRAINER_FILES}


def assert_no_base_stored(directory: Path, model) -> None:
    """No file in `directory` holds a frozen base tensor, and the model files hold about the adapter's size."""
    base_keys = {n for n, p in model.named_parameters() if not p.requires_grad}
    base_keys |= {key.replace(".base_layer.", ".") for key in base_keys}  # the same tensors' names in a plain model
    for path in Path(directory).glob("*.safetensors"):
        stored = safetensors_keys(path)
        assert not stored & base_keys, f"{path.name} stores base tensors {sorted(stored & base_keys)[:3]}"
    assert {p.name for p in Path(directory).glob("*.bin")} <= {"training_args.bin"}  # no pytorch_model.bin
    files = model_files(directory)
    adapter_bytes = files["adapter.safetensors"]
    header = json.loads((Path(directory) / "adapter.json").read_text())
    tensor_bytes = sum(size for name, size in files.items() if name.endswith(".safetensors"))
    # the adapter and the resume file (the same tensors again, plus a header of about 1 KB per module)
    assert tensor_bytes <= 2 * adapter_bytes + 1500 * len(header["modules"]) + 4096, files
