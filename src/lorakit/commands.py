"""What each `lorakit` subcommand does (parsing lives in `lorakit.cli`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .atomic import write_json
from .errors import ConfigError, LorakitError
from .training.run_config import TrainConfig, check_writable

MERGED_MARKER = "lorakit_merged.json"


def run_train(args) -> int:
    from .training import train

    summary = train(TrainConfig.from_args(args))
    if summary:
        loss = summary["final_eval_loss"] if summary["final_eval_loss"] is not None else summary["final_train_loss"]
        kind = "eval" if summary["final_eval_loss"] is not None else "train"
        print(
            f"done: {summary['steps']} steps, final {kind} loss {loss:.4f}, {summary['trainable_parameters']:,} "
            f"trainable parameters, adapter {summary['adapter_bytes']:,} bytes -> {Path(args.out) / 'adapter'}"
        )
        if summary["frozen_adapters"]:
            stack = " ".join(f"--adapter {path}" for path in [*args.frozen_adapter, str(Path(args.out) / "adapter")])
            print(f"it trained on top of the frozen adapters: evaluate the stack with lorakit eval {stack}")
    return 0


def _positive(name: str, value: int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} {value} is invalid; use a {'non-negative' if allow_zero else 'positive'} integer")


def _load_adapted(args, labels=None):
    """(model, tokenizer) with the adapter from args.adapter applied, if any: one directory (a classifier's: as a
    classifier), or (generate) several NAME=DIR adapters on the one base."""
    from .models import load_model
    from .persist import load_adapter, read_adapter

    adapters = _adapters_of(args)
    labels = labels or _classifier_labels(args)
    metadata = {name: read_adapter(path)[0] for name, path in adapters.items()}  # validated before the slow load
    schemes = {adapter_quantization(meta) for meta in metadata.values()}
    if len(schemes) > 1:
        raise ConfigError(
            f"the adapters were trained on bases quantized differently ({', '.join(map(str, sorted(schemes, key=str)))}); "
            "serve together only adapters of one base"
        )
    scheme = next(iter(schemes), None)
    num_labels = len(labels) if labels else None
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, num_labels=num_labels)
    if labels:  # a merged classifier names its classes
        model.config.id2label, model.config.label2id = dict(enumerate(labels)), {v: i for i, v in enumerate(labels)}
    if adapters:
        for name, path in reversed(adapters.items()):  # the first adapter's tokenizer (--add-tokens) wins
            tokenizer = _adapter_tokenizer(path, model, metadata[name]) or tokenizer
        if Path(args.model, MERGED_MARKER).is_file():
            raise ConfigError(f"model {args.model} is already merged with an adapter; use the original base model")
        if scheme is not None:  # rebuild the base the adapter was trained on (lorakit train --quantize)
            from .quantize import quantize_model

            quantize_model(model, scheme)
            print(f"lorakit: the adapter was trained on a {scheme} base; quantized {args.model} the same way",
                  file=sys.stderr)
        for name, path in adapters.items():
            model = load_adapter(model, path, name=name, strict=getattr(args, "strict", True))
        if getattr(args, "command", None) == "eval" and len(adapters) > 1:  # a stack: their updates add up
            from .inject import set_active

            set_active(model, list(adapters))
    import torch

    if torch.cuda.is_available():  # eval / generate on the GPU when there is one
        model = model.to("cuda")
    return model, tokenizer


def _adapters_of(args) -> dict[str, str]:
    """generate: NAME=DIR adapters, one per prompt; eval: DIR adapters evaluated together."""
    if getattr(args, "command", None) == "eval":
        return stacked_adapter_arguments(args.adapter)
    return adapter_arguments(args.adapter)


def stacked_adapter_arguments(values) -> dict[str, str]:
    """eval's --adapter values: [DIR] -> {"default": DIR}; DIR DIR ... -> {"adapter_1": DIR, ...}, all active
    together (an adapter trained with --frozen-adapter and those under it)."""
    if not values:
        return {}
    if isinstance(values, str):
        values = [values]
    if len(values) == 1:
        return {"default": values[0]}
    if len({Path(value).resolve() for value in values}) < len(values):
        raise ConfigError("--adapter gives the same directory twice; give each adapter once")
    return {f"adapter_{i}": value for i, value in enumerate(values, start=1)}


def adapter_arguments(values) -> dict[str, str]:
    """--adapter values: [DIR] -> {"default": DIR}; NAME=DIR ... -> {NAME: DIR} (names checked, each once)."""
    if not values:
        return {}
    if isinstance(values, str):
        values = [values]
    if len(values) == 1 and "=" not in values[0]:
        return {"default": values[0]}
    adapters = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.isidentifier() or not path or name in ("base", "__base__"):
            raise ConfigError(
                f"--adapter {value!r} is not NAME=DIR; with several adapters name each, e.g. --adapter "
                "sql=runs/sql/adapter (NAME a Python identifier other than 'base')"
            )
        if name in adapters:
            raise ConfigError(f"--adapter names {name!r} twice; give each adapter its own name")
        adapters[name] = path
    return adapters


def _adapter_tokenizer(adapter, model, metadata):
    """The tokenizer saved beside an adapter trained with --add-tokens (or None), the model resized to its tokens."""
    from .models import _prepare_tokenizer
    from .token_rows import TOKENIZER_DIR, resize_for_adapter

    resize_for_adapter(model, metadata)
    if not Path(adapter, TOKENIZER_DIR).is_dir():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(Path(adapter, TOKENIZER_DIR)))
    _prepare_tokenizer(tokenizer)
    return tokenizer


def adapter_quantization(metadata: dict) -> str | None:
    """The scheme ("nf4", "fp4", "int8", "torchao-nf4") of the quantized base an adapter was trained on, or None."""
    from .quantize import SCHEMES

    dtypes = {info.get("base_dtype") for info in metadata["modules"].values()}
    schemes = sorted(d for d in dtypes if d in SCHEMES)
    return schemes[0] if len(schemes) == 1 else None


def run_eval(args) -> int:
    from .data import built_in_name, load_examples, read_records
    from .data.formats import detect_format
    from .training.evaluate import evaluate_loss, exact_match

    for flag in ("max_length", "batch_size"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    _positive("--limit", args.limit, allow_zero=True)
    _positive("--exact-match", args.exact_match, allow_zero=True)
    labels = _classifier_labels(args)
    if labels:
        return _eval_classifier(args, labels)
    model, tokenizer = _load_adapted(args)
    split = "eval" if built_in_name(args.data) else "train"  # a built-in dataset: its held-out split
    examples, fmt = load_examples(args.data, tokenizer, args.max_length, split=split)
    if args.limit:
        examples = examples[: args.limit]
    device = next(model.parameters()).device
    result = evaluate_loss(model, examples, args.batch_size, tokenizer.pad_token_id or 0, device)
    result["examples"] = len(examples)
    if fmt == "instruction" and args.exact_match:
        records = read_records(args.data, split=split)
        detect_format(records, args.data)
        result["exact_match"] = exact_match(model, tokenizer, records[: args.exact_match])
        result["exact_match_examples"] = min(args.exact_match, len(records))
    print(json.dumps(result))
    return 0


def _classifier_labels(args) -> list[str] | None:
    """The classes of a classifier adapter (--task classification), or None; with several adapters, those of a
    classifier among them."""
    from .training.classification import read_labels

    for path in _adapters_of(args).values():
        labels = read_labels(path)
        if labels:
            return labels
    return None


def _eval_classifier(args, labels: list[str]) -> int:
    """`lorakit eval` of a --task classification adapter: mean cross-entropy and accuracy on `text` / `label` data."""
    from .data import read_records
    from .training import classification

    model, tokenizer = _load_adapted(args, labels)
    examples = classification.tokenize(read_records(args.data), tokenizer, args.max_length, labels, args.data)
    if args.limit:
        examples = examples[: args.limit]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id or 0
    result = classification.evaluate(model, examples, args.batch_size, pad_id, device)
    result["examples"] = result.pop("eval_examples")
    print(json.dumps(result))
    return 0


def run_generate(args) -> int:
    from .training.evaluate import generate, generate_batch

    _positive("--max-new-tokens", args.max_new_tokens)
    adapters = adapter_arguments(args.adapter)
    if _classifier_labels(args):
        raise ConfigError(
            f"--adapter {args.adapter[0]} is a classifier (trained with --task classification); it does not generate "
            "text: use lorakit eval, which reports its accuracy"
        )
    if args.prompts is None:
        if len(adapters) > 1:
            raise ConfigError("several --adapter with --prompt: name one per prompt with --prompts FILE instead")
        model, tokenizer = _load_adapted(args)
        print(generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens))
        return 0
    requests = read_prompts(args.prompts, adapters)
    model, tokenizer = _load_adapted(args)
    names = [request["adapter"] for request in requests]
    completions = generate_batch(
        model, tokenizer, [request["prompt"] for request in requests], names, max_new_tokens=args.max_new_tokens
    )
    for request, completion in zip(requests, completions):
        print(json.dumps({**request, "completion": completion}, ensure_ascii=False))
    return 0


def read_prompts(path, adapters: dict) -> list[dict]:
    """--prompts FILE: JSONL lines {"adapter": NAME, "prompt": TEXT}; "adapter" may be left out with one adapter.
    Read as every JSONL file is (`lorakit.data.readers`: UTF-8 with or without a BOM, one object per line)."""
    from .data.readers import _read_jsonl

    where = f"--prompts {path}"
    if not Path(path).is_file():
        raise ConfigError(f"{where}: no such file; give a JSONL file of prompts")
    requests = []
    default = next(iter(adapters)) if len(adapters) == 1 else None
    for number, record in enumerate(_read_jsonl(Path(path)), start=1):
        if not isinstance(record.get("prompt"), str):
            raise ConfigError(f'{where}: prompt {number} needs a "prompt" string, e.g. {{"adapter": "a", "prompt": "..."}}')
        name = record.get("adapter", default)
        if name not in (*adapters, "base", "__base__"):
            known = ", ".join([*adapters, "base"])
            raise ConfigError(f"{where}: prompt {number} names adapter {name!r}; use one of: {known}")
        requests.append({"adapter": name, "prompt": record["prompt"]})
    if not requests:
        raise ConfigError(f"{where} holds no prompts; write one JSON object per line")
    return requests


def _check_new_output(out: Path) -> None:
    check_writable(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; choose a new directory")


def _publish(tmp: Path, out: Path) -> None:
    """Move a fully written temporary directory into place as `out`."""
    if out.exists():
        out.rmdir()  # empty, checked before
    os.replace(tmp, out)


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def run_merge(args) -> int:
    from .inject import merge_and_unload
    from .persist import read_adapter
    from .quantize import dequantize_model

    out = Path(args.out)
    _check_new_output(out)
    model, tokenizer = _load_adapted(args)
    metadata, _, _ = read_adapter(args.adapter)
    merged = dequantize_model(merge_and_unload(model))  # a quantized base: full precision, never re-quantized
    tmp = _staging_dir(out)
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(
            tmp / MERGED_MARKER,
            {
                "adapter": str(Path(args.adapter).resolve()),
                "method": metadata["method"],
                "tensors_sha256": metadata["tensors_sha256"],
            },
        )
        _publish(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LorakitError(f"could not write the merged model to {out}: {exc.strerror or exc}") from None
    scheme = adapter_quantization(metadata)
    where = f" in full precision, onto the dequantized {scheme} weights the adapter was trained on" if scheme else ""
    print(f"merged model written to {out}{where} (load it with transformers' from_pretrained)")
    return 0


EXPORT_FORMATS = ("peft",)


def run_export(args) -> int:
    from .peft_format import export_peft

    if args.format not in EXPORT_FORMATS:
        raise ConfigError(f"--format {args.format!r} is unknown; use one of: {', '.join(EXPORT_FORMATS)}")
    out = Path(args.out)
    _check_new_output(out)
    model, _ = _load_adapted(args)
    tmp = _staging_dir(out)
    try:
        export_peft(model, tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"PEFT LoRA adapter written to {out}")
    return 0


def run_inspect(args) -> int:
    from .persist import module_ranks, read_adapter

    metadata, config, tensors = read_adapter(args.adapter)
    ranks = module_ranks(metadata, config)
    path = Path(args.adapter)
    size = sum((path / name).stat().st_size for name in ("adapter.safetensors", "adapter.json"))
    modules = metadata["modules"]
    digests = {name: _digest(m["base_fingerprint"]) for name, m in modules.items()}
    fingerprint = hashlib.sha256("".join(digests.values()).encode()).hexdigest()
    base = metadata.get("base_model") or {}
    lines = [
        f"adapter:     {path}",
        f"method:      {config.method}  (lorakit {metadata['lorakit_version']}, format {metadata['format_version']})",
        f"config:      {json.dumps({k: v for k, v in config.to_dict().items() if v not in (None, {}, [])})}",
        f"parameters:  {metadata.get('trainable_parameters', 0):,} trainable; {sum(t.numel() for t in tensors.values()):,} stored",
        f"file size:   {size:,} bytes",
        f"base model:  {base.get('class')} {base.get('name_or_path') or ''}".rstrip(),
        f"fingerprint: {len(modules)} modules, combined sha256 {fingerprint[:16]}",
    ]
    per_module = len(set(ranks.values())) > 1
    if per_module:
        lines.insert(3, f"ranks:       per module, {min(ranks.values())} to {max(ranks.values())}, total {sum(ranks.values())}")
    shown = modules if per_module else dict(list(modules.items())[:8])  # per-module ranks: every module's
    lines += [
        f"  {name}  {m['in']} -> {m['out']}{f'  r={ranks[name]}' if per_module else ''}  "
        f"{m.get('base_dtype', '')} weight fingerprint {digests[name][:12]}"
        for name, m in shown.items()
    ]
    if len(modules) > len(shown):
        lines.append(f"  ... and {len(modules) - len(shown)} more")
    for name, entry in (metadata.get("modules_to_save") or {}).items():
        shapes = ", ".join(f"{key} {'x'.join(map(str, shape))}" for key, shape in entry["tensors"].items())
        lines.append(f"trained in full: {name} ({entry['class']}: {shapes})")
    tokens = metadata.get("trainable_tokens")
    if tokens:
        where = ", ".join(f"{name} ({entry['kind']})" for name, entry in tokens["modules"].items())
        ids = tokens["ids"]
        lines.append(f"token rows:  {len(ids)} ids {ids[:8]} in {where}; head tied: {tokens['tied']}")
    print("\n".join(lines))
    return 0


def _digest(fingerprint) -> str:
    return fingerprint if isinstance(fingerprint, str) else fingerprint["digest"]  # format version 1 / 2


def run_compare(args) -> int:
    from .compare import run_compare_command

    return run_compare_command(args)
