"""Training data: read records from files or the hub, detect their format, tokenize with loss masks.

Formats, detected from the fields of the records:
- text: {"text": ...}, packed into blocks of `max_length` tokens (documents joined by EOS), every token trained;
- instruction: {"instruction", "input" (optional), "output"} as in Alpaca;
- chat: {"messages": [{"role", "content"}, ...]}, rendered with the tokenizer's chat template.
For instruction and chat data only the response tokens carry labels; the prompt is masked with -100.

Built-in datasets, generated on this machine: `stdlib-docstrings`, `manpages-summaries` and `uuid-pairs[:n=N,seed=S]`
(see `BUILT_IN`); each has a train and an eval split (for `uuid-pairs` they are the same pairs: memorisation).
"""

from __future__ import annotations

from .formats import detect_format, tokenize_records
from .readers import BUILT_IN, DATA_SUFFIXES, built_in_name, read_records

__all__ = [
    "BUILT_IN",
    "DATA_SUFFIXES",
    "built_in_name",
    "default_eval_source",
    "detect_format",
    "read_records",
    "tokenize_records",
    "load_examples",
]


def default_eval_source(data: str | None) -> str | None:
    """The evaluation data used when none is given: a built-in dataset's own eval split, else nothing."""
    return data if built_in_name(data) else None


def load_examples(source: str, tokenizer, max_length: int, *, split: str = "train") -> tuple[list[dict], str]:
    """Read `source` and return (tokenized examples, format name)."""
    records = read_records(source, split=split)
    fmt = detect_format(records, source)
    return tokenize_records(records, fmt, tokenizer, max_length, source), fmt
