"""Trainable rows of a few tokens: `AdapterConfig(trainable_tokens=[ids])`, PEFT's `trainable_token_indices`.

For the k token ids t_1..t_k, a k x d tensor R holds the rows that train; the embedding E (V x d) stays frozen:

    embedding:  e(x) = R[j]   where x = t_j,   E[x] otherwise       (times `embed_scale` where the model scales)
    head:       logits[..., t_j] = h · R_head[j] (+ b[t_j]),          the other logits h · W[v] as before

R starts as the rows' current values (the output is unchanged at the start) and replaces them: a row re-drawn by
another `resize_token_embeddings` (new tokens) does not matter. An untied output head gets its own R_head; a head
tied to the embedding (`tie_word_embeddings`, SmolLM2) uses the embedding's R, so both see the same new rows. A
forward costs one lookup and one k-column product, never a copy of E. Only R (and R_head) train and are stored: k x
d numbers each and the ids. The file fingerprints the rows that do NOT train (`lorakit.fingerprint`), so it checks
the base while the new tokens' rows, random at every resize, are left out. `disabled()` and `unload()` give the
original embedding and head; `merge_and_unload()` writes R into them; `merge()` leaves the rows as they are.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from . import swap
from .config import AdapterConfig
from .errors import APPLY_ANYWAY, BaseModelMismatchError, ConfigError
from .fingerprint import DIFFERENT, Fingerprint

FILE_KEY = "trainable_tokens"  # the adapter.json section, and the prefix of its tensors


def _rows_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype  # as adapter factors


def untrained_fingerprint(weight: torch.Tensor, ids: torch.Tensor) -> Fingerprint:
    """Fingerprint of the rows of `weight` (V x d) outside `ids`."""
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[ids] = False
    return Fingerprint.of(weight.detach()[keep])


class _Rows(nn.Module):
    """What the embedding and the head share: the base module, the ids, the flag."""

    def __init__(self, base: nn.Module, ids: list[int], fingerprint: Fingerprint | None, own_rows: bool):
        super().__init__()
        self.base = base
        weight = base.weight
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=weight.device), persistent=False)
        self.base_fingerprint = fingerprint or untrained_fingerprint(weight, self.ids)
        if own_rows:
            self.rows = nn.Parameter(weight.detach()[self.ids].to(_rows_dtype(weight)).clone())
        self.disabled = False

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {"rows": self.rows} if "rows" in self._parameters else {}

    def write_rows(self) -> None:
        """Write R into the base weight (merge_and_unload)."""
        with torch.no_grad():
            self.base.weight[self.ids] = self.rows.to(self.base.weight.dtype)


class TokenRows(_Rows):
    """An nn.Embedding whose rows `ids` are replaced by the trained `rows` (k x d)."""

    def __init__(self, base: nn.Embedding, ids: list[int], fingerprint: Fingerprint | None = None):
        super().__init__(base, ids, fingerprint, own_rows=True)
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=base.weight.device)
        slot[self.ids] = torch.arange(len(ids), device=slot.device)
        self.register_buffer("slot", slot, persistent=False)  # token id -> its row in `rows`, or -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.disabled:
            return out
        slot = self.slot[x]
        new = F.embedding(slot.clamp(min=0), self.rows).to(out.dtype)
        scale = getattr(self.base, "embed_scale", None)  # Gemma's scaled embeddings multiply in their forward
        if scale is not None:
            new = new * torch.as_tensor(scale, dtype=out.dtype, device=out.device)
        return torch.where((slot >= 0).unsqueeze(-1), new, out)


class HeadRows(_Rows):
    """An output head (nn.Linear, V outputs) whose logits for `ids` use trained rows: its own, or, when tied,
    those of the embedding's `TokenRows`."""

    def __init__(self, base: nn.Linear, ids: list[int], tied_to: TokenRows | None, fingerprint=None):
        super().__init__(base, ids, fingerprint, own_rows=tied_to is None)
        object.__setattr__(self, "tied_to", tied_to)  # a plain reference: the embedding owns (and saves) the rows

    @property
    def current_rows(self) -> torch.Tensor:
        return self.rows if self.tied_to is None else self.tied_to.rows

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.base(h)
        if self.disabled:
            return out
        bias = None if self.base.bias is None else self.base.bias[self.ids].to(h.dtype)
        new = F.linear(h, self.current_rows.to(h.dtype), bias).to(out.dtype)
        return out.index_copy(out.dim() - 1, self.ids, new)


def token_rows(model: nn.Module) -> Iterator[tuple[str, _Rows]]:
    for name, module in model.named_modules():
        if isinstance(module, _Rows):
            yield name, module


def _embedding_and_head(model: nn.Module):
    """(name, module) of the input embedding and of the output head (None where the model has none)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    names = {id(m): n for n, m in model.named_modules()}
    return (
        (names.get(id(embedding)), embedding) if embedding is not None else (None, None),
        (names.get(id(head)), head) if head is not None else (None, None),
    )


def build(model: nn.Module, config: AdapterConfig, targets: list[str], saved: list[str]) -> dict[str, _Rows]:
    """The embedding's (and head's) `TokenRows` / `HeadRows`, not yet installed; ConfigError if they cannot be."""
    if not config.trainable_tokens:
        return {}
    (embed_name, embedding), (head_name, head) = _embedding_and_head(model)
    if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None:
        raise ConfigError(
            f"trainable_tokens needs the model's input embedding to be an nn.Embedding; {type(model).__name__} has "
            f"{type(embedding).__name__}: train it in full with modules_to_save instead"
        )
    vocab = embedding.num_embeddings
    outside = [t for t in config.trainable_tokens if t >= vocab]
    if outside:
        raise ConfigError(
            f"trainable_tokens id {outside[0]} is outside the input embedding's {vocab} rows; add the tokens to the "
            "tokenizer and resize the model's embeddings first (model.resize_token_embeddings(len(tokenizer)))"
        )
    for owner in (embed_name, head_name):
        if owner is not None and (owner in saved or owner in targets):
            what = "modules_to_save" if owner in saved else "targets"
            raise ConfigError(f"trainable_tokens and {what} both take {owner}; keep it in one of them")
    rows = {embed_name: TokenRows(embedding, config.trainable_tokens)}
    if isinstance(head, nn.Linear) and head.out_features == vocab:
        tied = head.weight is embedding.weight
        rows[head_name] = HeadRows(head, config.trainable_tokens, rows[embed_name] if tied else None)
    return rows



def unload(model: nn.Module, *, keep_trained: bool = False) -> None:
    """Put the embedding and head back (`keep_trained`: with the trained rows written in, as merge_and_unload)."""
    for name, module in list(token_rows(model)):
        if keep_trained and "rows" in module._parameters:
            module.write_rows()  # a tied head shares the embedding's weight, written once
        swap.set_module(model, name, module.base)


# the EXTRAS interface shared with the other wrappers (lorakit.swap)
install, set_disabled, restore_disabled, trainable_parameters = swap.functions_for(token_rows)


# ----------------------------------------------------------------- the adapter file
def to_file(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors "trainable_tokens.<module>.rows", the adapter.json section) of the model's token rows."""
    modules = dict(token_rows(model))
    if not modules:
        return {}, {}
    tensors, info = {}, {"ids": None, "tied": False, "modules": {}}
    for name, module in modules.items():
        info["ids"] = module.ids.tolist()
        entry = {
            "kind": "head" if isinstance(module, HeadRows) else "embedding",
            "rows": list(module.base.weight.shape),
            "base_fingerprint": module.base_fingerprint.to_json(),
        }
        if "rows" in module._parameters:
            tensors[f"{FILE_KEY}.{name}.rows"] = module.rows.detach().to("cpu").contiguous()
        else:
            info["tied"] = True
        info["modules"][name] = entry
    return tensors, info


def validate(info, fail) -> None:
    if info is None:
        return
    if not isinstance(info, dict) or not isinstance(info.get("modules"), dict) or not info["modules"]:
        fail(f"'{FILE_KEY}' must be an object with 'modules'")
    ids = info.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        fail(f"'{FILE_KEY}' needs 'ids', a list of token ids")
    if len(set(ids)) != len(ids) or not isinstance(info.get("tied"), bool):
        fail(f"'{FILE_KEY}' has repeated ids or no 'tied'")
    kinds = sorted(entry.get("kind", "") for entry in info["modules"].values() if isinstance(entry, dict))
    if kinds not in (["embedding"], ["embedding", "head"]):
        fail(f"'{FILE_KEY}' must list one embedding and at most one head")
    for name, entry in info["modules"].items():
        shape = entry.get("rows")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            fail(f"{FILE_KEY} entry {name!r} has an invalid 'rows' shape")
        if max(ids) >= shape[0]:
            fail(f"{FILE_KEY} entry {name!r} has ids beyond its {shape[0]} rows")
        try:
            Fingerprint.from_json(entry.get("base_fingerprint"))
        except (ValueError, TypeError) as exc:
            fail(f"{FILE_KEY} entry {name!r} has an invalid base fingerprint ({exc})")


def file_shapes(info: dict | None) -> dict[str, tuple[int, ...]]:
    if not info:
        return {}
    return {
        f"{FILE_KEY}.{name}.rows": (len(info["ids"]), entry["rows"][1])
        for name, entry in info["modules"].items()
        if not (info["tied"] and entry["kind"] == "head")
    }


def from_file(model: nn.Module, info: dict | None, tensors: dict, *, strict: bool = True) -> dict[str, _Rows]:
    """Check the embedding (and head) against the file and build (not install) their rows with the saved values."""
    if not info:
        return {}
    named = dict(model.named_modules())
    (embed_name, embedding), (head_name, head) = _embedding_and_head(model)
    modules, different = {}, []
    embed_entry = next(name for name, entry in info["modules"].items() if entry["kind"] == "embedding")
    order = sorted(info["modules"], key=lambda name: info["modules"][name]["kind"] != "embedding")
    for name in order:
        entry = info["modules"][name]
        module = named.get(name)
        kind = nn.Embedding if entry["kind"] == "embedding" else nn.Linear
        if not isinstance(module, kind) or list(module.weight.shape) != entry["rows"]:
            now = "none" if module is None or not hasattr(module, "weight") else f"{tuple(module.weight.shape)}"
            raise BaseModelMismatchError(
                f"base module {name} is {now} but the adapter's trainable tokens need it to be "
                f"{tuple(entry['rows'])}",
                "load it onto the base model it was trained on (with added tokens: the tokenizer saved beside the "
                "adapter, and model.resize_token_embeddings(len(tokenizer)))",
            )
        tied = entry["kind"] == "head" and module.weight is named[embed_entry].weight
        if entry["kind"] == "head" and tied != info["tied"]:
            raise BaseModelMismatchError(
                f"the adapter was trained with {name} {'tied' if info['tied'] else 'not tied'} to the input "
                f"embedding, and this base has it {'tied' if tied else 'not tied'}",
                "load it onto the base model it was trained on",
            )
        saved = Fingerprint.from_json(entry["base_fingerprint"])
        ids = torch.tensor(info["ids"], dtype=torch.long, device=module.weight.device)
        if saved.compare(untrained_fingerprint(module.weight, ids))[0] == DIFFERENT:
            different.append(name)
        if entry["kind"] == "embedding":
            modules[name] = TokenRows(module, info["ids"], saved)
        else:
            modules[name] = HeadRows(module, info["ids"], modules[embed_entry] if tied else None, saved)
        if "rows" in modules[name]._parameters:
            with torch.no_grad():
                modules[name].rows.copy_(tensors[f"{FILE_KEY}.{name}.rows"])
    heads = [n for n in modules if n != embed_entry]
    if embed_entry != embed_name or (heads and heads != [head_name]):
        raise BaseModelMismatchError(
            f"the adapter's trainable tokens are on {sorted(modules)}, which are not this model's input embedding "
            "and output head",
            "load it onto the base model it was trained on",
        )
    if different:
        message = (
            f"base module {different[0]} has different weights than the adapter was trained on (in the rows of the "
            "tokens that do not train)"
        )
        if strict:
            raise BaseModelMismatchError(message, f"load it onto the same base model, {APPLY_ANYWAY}")
        warnings.warn(f"{message}; applying it anyway", stacklevel=3)
    return modules


def load_into(model: nn.Module, tensors: dict) -> None:
    """Copy a file's (checked) rows into the model's existing token rows (resuming a Trainer run)."""
    with torch.no_grad():
        for name, module in token_rows(model):
            if "rows" in module._parameters:
                module.rows.copy_(tensors[f"{FILE_KEY}.{name}.rows"])


# ----------------------------------------------------------------- new tokens (lorakit train --add-tokens)
TOKENIZER_DIR = "tokenizer"  # where `lorakit train --add-tokens` saves the tokenizer, inside the adapter directory


def add_tokens(model: nn.Module, tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` to the tokenizer (as special tokens: never split) and resize the model's embeddings to hold them
    (transformers' mean-and-covariance init of the new rows); returns their ids, those already known included."""
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if max(ids) >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return ids


def resize_for_adapter(model: nn.Module, metadata: dict) -> None:
    """Give the model the embedding rows an adapter with added tokens was trained with (their values do not matter:
    the adapter's rows replace them)."""
    info = metadata.get(FILE_KEY) or {}
    rows = [entry["rows"][0] for entry in info.get("modules", {}).values() if entry["kind"] == "embedding"]
    embedding = model.get_input_embeddings()
    if rows and embedding is not None and rows[0] > embedding.num_embeddings:
        model.resize_token_embeddings(rows[0], mean_resizing=False)
