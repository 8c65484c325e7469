"""Data: every file type, format detection, prompt masking token by token, packing, and one-line errors."""

from __future__ import annotations

import csv
import json

import pytest
from tiny_assets import build_tokenizer

import lorakit
from lorakit.data import load_examples, read_records
from lorakit.data.formats import IGNORE

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hello there."},
    {"instruction": "Add", "input": "1 and 2", "output": "3"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_reads_the_same_records(suffix, tmp_path):
    records = read_records(str(write(tmp_path / f"d{suffix}", ROWS)))
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in records] == ROWS


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
def test_a_utf8_byte_order_mark_is_not_data(suffix, tmp_path):
    plain = tmp_path / f"plain{suffix}"
    if suffix == ".txt":
        plain.write_text("first doc\n\nsecond doc\n", encoding="utf-8")
    else:
        write(plain, ROWS)
    marked = tmp_path / f"marked{suffix}"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # what Windows editors save as "UTF-8 with BOM"
    assert read_records(str(marked)) == read_records(str(plain))


def test_txt_documents_are_split_on_blank_lines(tmp_path):
    (tmp_path / "d.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    assert read_records(str(tmp_path / "d.txt")) == [{"text": "first doc\nline two"}, {"text": "second doc"}]


def _trained_text(tokenizer, example):
    return tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE])


def test_instruction_prompt_is_masked_token_by_token(tokenizer, tmp_path):
    examples, fmt = load_examples(str(write(tmp_path / "d.jsonl", ROWS)), tokenizer, 512)
    assert fmt == "instruction"
    for example, row in zip(examples, ROWS):
        labels, ids = example["labels"], example["input_ids"]
        first = next(i for i, l in enumerate(labels) if l != IGNORE)
        assert all(l == IGNORE for l in labels[:first])  # the whole prompt carries no loss
        assert labels[first:] == ids[first : len(labels)] or all(
            l in (t, IGNORE) for l, t in zip(labels[first:], ids[first:])
        )
        assert _trained_text(tokenizer, example) == row["output"] + "<|im_end|>"
        prompt = tokenizer.decode(ids[:first])
        assert row["instruction"] in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_instruction_without_chat_template_uses_plain_prompt(tmp_path):
    tokenizer = build_tokenizer(chat_template=False)
    examples, _ = load_examples(str(write(tmp_path / "d.jsonl", ROWS)), tokenizer, 512)
    assert _trained_text(tokenizer, examples[1]) == "3<|im_end|>"
    assert "### Input:\n1 and 2" in tokenizer.decode(examples[1]["input_ids"])


def test_chat_trains_only_assistant_turns(tokenizer, tmp_path):
    chat = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "see you"},
            ]
        }
    ]
    examples, fmt = load_examples(str(write(tmp_path / "c.jsonl", chat)), tokenizer, 512)
    assert fmt == "chat"
    assert _trained_text(tokenizer, examples[0]) == "hello<|im_end|>see you<|im_end|>"


def test_text_is_packed_into_blocks(tokenizer, tmp_path):
    rows = [{"text": "the quick brown fox jumps over the lazy dog " * 5} for _ in range(6)]
    examples, fmt = load_examples(str(write(tmp_path / "t.jsonl", rows)), tokenizer, 32)
    assert fmt == "text"
    assert all(len(e["input_ids"]) == 32 for e in examples[:-1]) and len(examples) > 3
    assert all(e["labels"] == e["input_ids"] for e in examples)
    stream = [t for e in examples for t in e["input_ids"]]
    assert stream.count(tokenizer.eos_token_id) == 6  # one EOS after each document


def test_truncation_to_max_length(tokenizer, tmp_path):
    rows = [{"instruction": "x", "output": "word " * 200}]
    examples, _ = load_examples(str(write(tmp_path / "d.jsonl", rows)), tokenizer, 40)
    assert len(examples[0]["input_ids"]) == 40


ERRORS = {
    "missing file": (None, "data file .*missing.jsonl not found"),
    "empty": ("", "holds no records"),
    "broken line": ('{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
    "missing output": ('{"instruction": "a"}\n', "record 1 lacks a text field 'output'"),
    "unknown fields": ('{"question": "a"}\n', "expected 'text', 'instruction' \\+ 'output', or 'messages'"),
    "missing text": ('{"text": "a"}\n{"body": "b"}\n', "record 2 lacks a text field 'text'"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_data_errors_name_the_file_and_problem(case, tokenizer, tmp_path):
    content, message = ERRORS[case]
    path = tmp_path / "missing.jsonl" if content is None else tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(lorakit.DataError, match=message):
        load_examples(str(path), tokenizer, 64)


def test_prompt_longer_than_max_length_everywhere(tokenizer, tmp_path):
    rows = [{"instruction": "word " * 100, "output": "x"}]
    with pytest.raises(lorakit.DataError, match="every prompt is longer than --max-length 16"):
        load_examples(str(write(tmp_path / "d.jsonl", rows)), tokenizer, 16)
