"""Serving several LoRA adapters on one base: a mixed batch, lorakit against PEFT's `adapter_names`.

SmolLM2-135M-Instruct, fp32, `torch.no_grad`. Two shapes: prefill, a batch of 16 sequences x 128 tokens; decode,
one step of 16 sequences x 1 token (a forward of the 16 new tokens, no KV cache: the per-step cost of the adapter
path, which is what differs between the setups). Row i uses adapter i mod N, for N = 1, 4 and 16 distinct LoRA r=16
adapters on every linear layer but the head. Setups, each timed interleaved with the others (one call of each per
round, the order rotated by one each round, the median of the rounds; decode steps are short, so they get
DECODE_ROUNDS_FACTOR times the rounds, 12 setups x 21 rounds at the default 7):

- lorakit mixed: `model(ids, adapter_names=[...])` (lorakit.routing: stacked factors, two batched products);
- peft mixed: PEFT 0.21 `model(input_ids=ids, adapter_names=[...])` (its loop over sub-batches);
- lorakit one / peft one: one unmerged adapter active for every row (what a mixed batch is compared with);
- base: the model without adapters; merged: one adapter merged into the weights (lorakit.merge);
- mini one / mini mixed: LoRA-Mini (a=b=64, one seed, so the adapters share their outer matrices): one adapter,
  and 16 in a mixed batch.

Both tools hold the same factors (PEFT's copied from lorakit's), and the first rows' logits are compared.

python benchmarks/bench_multi_adapter.py [ROUNDS] [decode]  ->  benchmarks/results-multi-adapter.json and a table
(`decode`: the decode shape only, about 2 minutes instead of 10, written to results-multi-adapter-decode.json).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine, smollm2  # noqa: E402

import lorakit  # noqa: E402

COUNTS = (1, 4, 16)
SHAPES = {"prefill": (16, 128), "decode": (16, 1)}
RANK = 16
DECODE_ROUNDS_FACTOR = 3  # a decode step takes ~0.15 s against ~5 s for prefill: more rounds, a steadier median


def _random_adapters(model, count: int, method: str = "lora", **options) -> list[str]:
    names = []
    for i in range(count):
        name = None if i == 0 else f"a{i}"
        config = lorakit.AdapterConfig(method=method, r=RANK, seed=0 if method == "mini" else i, **options)
        lorakit.adapt(model, config, name=name)
        names.append(name or "default")
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, layer in lorakit.adapter_layers(model, names[-1]):
                for param in layer.trainable_parameters().values():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return names


def _peft_copy(base, ours, names):
    import peft

    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"), "default"
    )
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"))
    layers = {name: dict(lorakit.adapter_layers(ours, name)) for name in names}
    with torch.no_grad():
        for module_name, module in model.named_modules():
            target = module_name.removeprefix("base_model.model.")
            if hasattr(module, "lora_A") and target in layers["default"]:
                for name in names:
                    module.lora_A[name].weight.copy_(layers[name][target].A)
                    module.lora_B[name].weight.copy_(layers[name][target].B)
    return model.eval()


def _time_interleaved(calls: dict, rounds: int) -> dict[str, float]:
    for fn in calls.values():  # warm-up (and the mixed batch's stacks)
        fn()
    times = {key: [] for key in calls}
    keys = list(calls)
    for round_ in range(rounds):  # each round starts one setup later: no setup always follows the same one
        for key in keys[round_ % len(keys) :] + keys[: round_ % len(keys)]:
            start = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


@torch.no_grad()
def run(rounds: int = 7, shapes: tuple[str, ...] = tuple(SHAPES)) -> dict:
    base = smollm2().eval()
    vocab = base.config.vocab_size
    results = {"rank": RANK, "rounds": {"prefill": rounds, "decode": rounds * DECODE_ROUNDS_FACTOR}, "shapes": {}}
    ours = copy.deepcopy(base)
    names = _random_adapters(ours, max(COUNTS))
    ours.eval()
    theirs = _peft_copy(base, ours, names)
    merged = copy.deepcopy(base)
    _random_adapters(merged, 1)
    lorakit.merge(merged.eval())
    mini = copy.deepcopy(base)
    mini_names = _random_adapters(mini, max(COUNTS), method="mini", mini_a=64, mini_b=64)
    mini.eval()
    check = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(1))
    rows = [names[i] for i in range(4)]
    results["max_abs_diff_vs_peft"] = float(
        (ours(check, adapter_names=rows).logits - theirs(input_ids=check, adapter_names=rows).logits).abs().max()
    )
    for shape_name, (batch, length) in ((name, SHAPES[name]) for name in shapes):
        ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(2))
        lorakit.set_active(ours, "default")
        lorakit.set_active(mini, "default")
        theirs.set_adapter("default")
        calls = {
            "base": lambda ids=ids: base(ids),
            "merged": lambda ids=ids: merged(ids),
            "lorakit one": lambda ids=ids: ours(ids),
            "peft one": lambda ids=ids: theirs(input_ids=ids),
            "mini one": lambda ids=ids: mini(ids),
        }
        for count in COUNTS:
            routed = [names[i % count] for i in range(batch)]
            calls[f"lorakit mixed {count}"] = lambda routed=routed, ids=ids: ours(ids, adapter_names=routed)
            calls[f"peft mixed {count}"] = lambda routed=routed, ids=ids: theirs(input_ids=ids, adapter_names=routed)
        mini_routed = [mini_names[i % max(COUNTS)] for i in range(batch)]
        calls[f"mini mixed {max(COUNTS)}"] = lambda ids=ids, rows=mini_routed: mini(ids, adapter_names=rows)
        times = _time_interleaved(calls, results["rounds"][shape_name])
        tokens = batch * length
        results["shapes"][shape_name] = {
            "batch": batch,
            "tokens": length,
            "seconds": times,
            "tokens_per_s": {key: tokens / value for key, value in times.items()},
        }
    n = max(COUNTS)
    results["goals"] = {}
    if "decode" in results["shapes"]:
        decode = results["shapes"]["decode"]["seconds"]
        results["goals"] |= {
            "decode 16: lorakit tokens/s over PEFT's (>= 2)": decode[f"peft mixed {n}"] / decode[f"lorakit mixed {n}"],
            "decode 16: lorakit mixed / lorakit one unmerged (<= 1.5)": decode[f"lorakit mixed {n}"]
            / decode["lorakit one"],
            "decode 16 Mini (shared outer) / one Mini (<= 1.15)": decode[f"mini mixed {n}"] / decode["mini one"],
        }
    if "prefill" in results["shapes"]:
        prefill = results["shapes"]["prefill"]["seconds"]
        results["goals"] |= {
            "prefill 16: lorakit mixed / PEFT mixed (<= 1.05)": prefill[f"lorakit mixed {n}"]
            / prefill[f"peft mixed {n}"],
            "prefill 16: lorakit mixed / lorakit one unmerged (<= 1.1)": prefill[f"lorakit mixed {n}"]
            / prefill["lorakit one"],
        }
    return results


LIMITS = {  # goal: (operator, bound)
    "decode 16: lorakit tokens/s over PEFT's (>= 2)": (">=", 2.0),
    "decode 16: lorakit mixed / lorakit one unmerged (<= 1.5)": ("<=", 1.5),
    "prefill 16: lorakit mixed / PEFT mixed (<= 1.05)": ("<=", 1.05),
    "prefill 16: lorakit mixed / lorakit one unmerged (<= 1.1)": ("<=", 1.1),
    "decode 16 Mini (shared outer) / one Mini (<= 1.15)": ("<=", 1.15),
}


def markdown(results: dict) -> str:
    lines = ["| setup | prefill 16x128 (ms) | decode 16x1 (ms) | decode tokens/s |", "|---|---|---|---|"]
    prefill, decode = results["shapes"].get("prefill"), results["shapes"]["decode"]
    for key in decode["seconds"]:
        prefill_ms = f"{prefill['seconds'][key] * 1e3:.0f}" if prefill else "-"
        lines.append(
            f"| {key} | {prefill_ms} | {decode['seconds'][key] * 1e3:.1f} | {decode['tokens_per_s'][key]:.0f} |"
        )
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for goal, value in results["goals"].items():
        op, bound = LIMITS[goal]
        met = value >= bound if op == ">=" else value <= bound
        lines.append(f"| {goal} | {value:.2f} | {'yes' if met else 'NO'} |")
    lines.append(f"\nlogits, lorakit vs PEFT mixed batch: max |diff| {results['max_abs_diff_vs_peft']:.2e}")
    return "\n".join(lines)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    decode_only = sys.argv[2:] == ["decode"]
    results = {"machine": machine(), **run(rounds, ("decode",) if decode_only else tuple(SHAPES))}
    name = "results-multi-adapter-decode.json" if decode_only else "results-multi-adapter.json"
    (HERE / name).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
