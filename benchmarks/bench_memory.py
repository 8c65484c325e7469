"""Peak memory and step time of LoRA training: fp32, nf4 QLoRA, nf4 QLoRA + gradient checkpointing, lorakit against
PEFT + bitsandbytes, side by side in one run.

Each (model, setting, tool) runs in its own child process: the model is built (SmolLM2-135M, or a ~1.1B Llama of
TinyLlama's shape with random weights), quantized with bitsandbytes (`lorakit.quantize.quantize_model`: the same
`Linear4bit` layers, nf4, blocksize 64, double quantization, that `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` makes) and adapted (LoRA r=16 on every linear layer but
the head), then the peak is reset (VmHWM, after malloc_trim) and it trains one warm-up and STEPS AdamW steps on batch
4 x 256. Peak: the child's VmHWM (CPU) or `torch.cuda.max_memory_allocated` (GPU), so with the weights resident.
PEFT's loss is transformers' own (`labels=`, the whole logits); lorakit's is `token_loss_sum` (fused, no logits kept).

Bare: the frozen model (no adapter) run forward and backward to its input embeddings, with each loss: the memory a
LoRA step is compared with (issue target: at most 1.10x).

Floor: the process after imports (Python, torch, transformers) + every stored base tensor (4-bit weights with their
statistics, float32 embeddings and norms) + the adapter with its gradient and two AdamW moments + one decoder
block's saved activations at this batch (measured with saved-tensor hooks). Ratio: peak / floor.

python benchmarks/bench_memory.py [smollm2|1b|all] [STEPS]   (default: all, 3 steps on SmolLM2 and 1 on the 1B model)
Writes benchmarks/results-memory.json and prints a table. Children run with glibc's trim threshold at 0 (see
ALLOCATORS); with BENCH_GLIBC_DEFAULT=1, SmolLM2's rows are also measured under glibc's defaults.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"fp32": {}, "nf4": {"quantize": "nf4"}, "nf4+checkpointing": {"quantize": "nf4", "checkpointing": True}}
# lorakit only: the loss that keeps the whole logits (--full-logits), to price the fused loss in speed and memory
EXTRA = {"fp32+full-logits": {"full_logits": True}}
TOOLS = ("lorakit", "peft")
BATCH, SEQ, RANK = 4, 256, 16
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
OUT = Path(__file__).with_name("results-memory.json")


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def build_model(name: str):
    import torch

    if name == "smollm2":
        from lorakit.models import load_model

        model, _ = load_model("smollm2-135m")
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINYLLAMA))


def block_activation_bytes(model, device) -> int:
    """Bytes autograd saves for backward in one decoder block at this batch (its input included)."""
    import torch

    layer = model.model.layers[0]
    hidden = torch.randn(BATCH, SEQ, model.config.hidden_size, device=device, requires_grad=True)
    position_ids = torch.arange(SEQ, device=device)[None].expand(BATCH, -1)
    embeddings = model.model.rotary_emb(hidden, position_ids)
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(hidden, position_embeddings=embeddings, attention_mask=None, position_ids=position_ids)
    return total


def stored_base_bytes(model) -> int:
    from lorakit.base_layers import frozen_base

    total = 0
    for module in model.modules():
        frozen = frozen_base(module)
        own = [p for p in module.parameters(recurse=False) if not p.requires_grad]
        if frozen is not None and frozen.quantization is not None:
            total += frozen.bytes_per_parameter() * frozen.in_features * frozen.out_features
            own = [p for p in own if p is not module.weight]
        total += sum(p.numel() * p.element_size() for p in own)
    return int(total)


def child(model_name: str, setting: str, tool: str, steps: int) -> dict:
    import torch

    import lorakit
    from lorakit.quantize import quantize_model
    from lorakit.training.loop import enable_gradient_checkpointing
    from lorakit.training.loss import token_loss_sum

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runtime = rss_bytes()
    options = {**SETTINGS, **EXTRA}[setting]
    model = build_model(model_name)
    if options.get("quantize"):
        quantize_model(model, options["quantize"])
    model.requires_grad_(False)
    if tool == "bare":  # the frozen model's forward + backward to its input embeddings: no adapter
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    elif tool == "lorakit":
        lorakit.adapt(model, lorakit.AdapterConfig(r=RANK, alpha=RANK))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear"))
    model.to(device)
    if options.get("checkpointing"):
        enable_gradient_checkpointing(model.base_model.model if tool == "peft" else model)
    elif tool == "lorakit":  # what `lorakit train` does without checkpointing (lorakit.recompute)
        lorakit.recompute_adapter_inputs(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen).to(device)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    inner = model.base_model.model if tool == "peft" else model
    floor_parts = {
        "runtime": runtime,
        "base": stored_base_bytes(model),
        "adapter_grad_adam": sum(p.numel() for p in params) * 4 * 4,
        "one_block_activations": block_activation_bytes(inner, device),
    }

    def step():
        if tool in ("lorakit", "bare"):
            loss = token_loss_sum(model, batch, full_logits=options.get("full_logits", False)) / (BATCH * (SEQ - 1))
        else:
            loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()
    times, losses = [], []
    for k in range(steps + 1):
        start = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k:  # the first step warms up
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        floor_parts["runtime"] = 0
    else:
        peak = rss_bytes("VmHWM")
    return {"peak_bytes": peak, "step_s": statistics.median(times), "losses": losses, "floor_parts": floor_parts,
            "floor_bytes": sum(floor_parts.values()), "device": str(device)}


# glibc keeps freed heap memory for reuse and its high-water mark counts it: with its defaults, SmolLM2's nf4 step
# peaked 1.2-1.7 GB above its live tensors (benchmarks/results-memory.json, "glibc-default"). "trim" returns freed
# memory to the system at once (both tools alike), so the peak measures the tensors, not the allocator's history.
ALLOCATORS = {"trim": {"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}, "glibc-default": {}}


def run_child(model_name, setting, tool, steps, allocator="trim") -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **ALLOCATORS[allocator])
    proc = subprocess.run([sys.executable, __file__, "--child", model_name, setting, tool, str(steps)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n) -> str:
    return f"{n / 2**30:.2f}"


def main(which: str, steps: int | None) -> None:
    import torch

    models = ["smollm2", "1b"] if which == "all" else [which]
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results.update({"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                               f"torch {torch.__version__}", "batch": f"{BATCH}x{SEQ}", "rank": RANK})
    for model_name in models:
        n = steps or (3 if model_name == "smollm2" else 1)
        rows = {}
        for setting in SETTINGS:
            for tool in TOOLS:  # interleaved: lorakit then PEFT for each setting
                rows[f"{setting}/{tool}"] = run_child(model_name, setting, tool, n)
                print(model_name, setting, tool, {k: v for k, v in rows[f"{setting}/{tool}"].items()
                                                  if k != "floor_parts"}, flush=True)
        for setting in ("fp32", "fp32+full-logits"):  # the frozen model alone, with each loss
            rows[f"{setting}/bare"] = run_child(model_name, setting, "bare", n)
            print(model_name, setting, "bare", {k: v for k, v in rows[f"{setting}/bare"].items()
                                               if k != "floor_parts"}, flush=True)
        if model_name == "smollm2":
            for setting in EXTRA:
                rows[f"{setting}/lorakit"] = run_child(model_name, setting, "lorakit", n)
                print(model_name, setting, "lorakit", {k: v for k, v in rows[f"{setting}/lorakit"].items()
                                                       if k != "floor_parts"}, flush=True)
        default = {}
        if model_name == "smollm2" and os.environ.get("BENCH_GLIBC_DEFAULT") == "1":  # the same rows, glibc's defaults
            for setting in SETTINGS:
                for tool in TOOLS:
                    default[f"{setting}/{tool}"] = run_child(model_name, setting, tool, n, "glibc-default")
        results[model_name] = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": n,
                               "allocator": "trim", "rows": rows, "glibc-default": default}  # one model may be rerun alone
        OUT.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\n{model_name}: peak GiB (ratio to floor), step s")
        print("| setting | lorakit | PEFT + bitsandbytes | peak lorakit / PEFT | step lorakit / PEFT | floor |")
        print("|---|---|---|---|---|---|")
        for setting in SETTINGS:
            ours, theirs = rows[f"{setting}/lorakit"], rows[f"{setting}/peft"]
            if "error" in ours or "error" in theirs:
                print(f"| {setting} | {ours.get('error', '')} | {theirs.get('error', '')} | | | |")
                continue
            print(f"| {setting} | {gib(ours['peak_bytes'])} ({ours['peak_bytes'] / ours['floor_bytes']:.2f}x), "
                  f"{ours['step_s']:.2f} s | {gib(theirs['peak_bytes'])} ({theirs['peak_bytes'] / theirs['floor_bytes']:.2f}x), "
                  f"{theirs['step_s']:.2f} s | {ours['peak_bytes'] / theirs['peak_bytes']:.2f} | "
                  f"{ours['step_s'] / theirs['step_s']:.2f} | {gib(ours['floor_bytes'])} |")
        for setting in EXTRA:
            if setting + "/lorakit" in rows and "error" not in rows[setting + "/lorakit"]:
                row, fused = rows[setting + "/lorakit"], rows["fp32/lorakit"]
                print(f"{setting}: {gib(row['peak_bytes'])} GiB, {row['step_s']:.2f} s; fused loss / full logits: "
                      f"peak {fused['peak_bytes'] / row['peak_bytes']:.2f}, step {fused['step_s'] / row['step_s']:.2f}")
        for setting in ("fp32", "fp32+full-logits"):
            bare, lora = rows.get(f"{setting}/bare", {}), rows.get(f"{setting}/lorakit", {})
            if "peak_bytes" in bare and "peak_bytes" in lora:
                print(f"{setting}: LoRA step peak / frozen model's step peak {lora['peak_bytes'] / bare['peak_bytes']:.2f}"
                      f" ({gib(lora['peak_bytes'])} / {gib(bare['peak_bytes'])} GiB)")
        if default:
            print("glibc defaults, peak GiB lorakit / PEFT: " + ", ".join(
                f"{setting} {gib(default[f'{setting}/lorakit'].get('peak_bytes', 0))} / "
                f"{gib(default[f'{setting}/peft'].get('peak_bytes', 0))}" for setting in SETTINGS))
        fp32, nf4gc = rows["fp32/lorakit"], rows["nf4+checkpointing/lorakit"]
        if "error" not in fp32 and "error" not in nf4gc:
            print(f"nf4 + checkpointing / own fp32 peak: {nf4gc['peak_bytes'] / fp32['peak_bytes']:.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        model_name, setting, tool, steps = sys.argv[2:6]
        print(json.dumps(child(model_name, setting, tool, int(steps))))
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "all", int(sys.argv[2]) if len(sys.argv) > 2 else None)
