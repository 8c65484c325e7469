"""Read records (dicts) from JSONL / JSON / CSV / Parquet / TXT files, the built-in datasets, or a hub dataset.

Built-in datasets (generated on this machine, nothing downloaded): `stdlib-docstrings` (Python standard library),
`manpages-summaries` (the C library / system-call manual pages of `manpages-dev`) and `uuid-pairs[:n=N,seed=S]`
(MoRA's memorisation task; its eval split is its train split)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from ..errors import DataError
from . import manpages, stdlib_docstrings, uuid_pairs

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# name -> (loader(split, options), takes options); each has a train and an eval split
BUILT_IN = {
    stdlib_docstrings.NAME: (lambda split, options: stdlib_docstrings.load(split), False),
    manpages.NAME: (lambda split, options: manpages.load(split), False),
    uuid_pairs.NAME: (uuid_pairs.load, True),
}


def built_in_name(source: str | None) -> str | None:
    """The built-in dataset `source` names ("uuid-pairs" for "uuid-pairs:n=64"), or None."""
    if not source:
        return None
    name = source.partition(":")[0]
    return name if name in BUILT_IN else None


def _read_built_in(source: str, split: str) -> list[dict]:
    name, _, options = source.partition(":")
    loader, takes_options = BUILT_IN[name]
    if options and not takes_options:
        raise DataError(f"data {source}: {name} takes no options; pass --data {name}")
    return loader(split, options)


def read_records(source: str, *, split: str = "train") -> list[dict]:
    """Records of `source`; a DataError naming the file and the problem if it is missing, empty or unparsable."""
    if built_in_name(source):
        return _read_built_in(source, split)
    path = Path(source).expanduser()
    if path.suffix.lower() in DATA_SUFFIXES or path.exists():
        if path.is_dir():
            raise DataError(f"data {path} is a directory; pass a data file ({', '.join(DATA_SUFFIXES)})")
        if not path.is_file():
            raise DataError(f"data file {path} not found; check the path (formats: {', '.join(DATA_SUFFIXES)})")
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(DATA_SUFFIXES)}")
        try:
            records = reader(path)
        except OSError as exc:  # permissions, a file that vanished, an I/O error
            raise DataError(f"data file {path} cannot be read ({exc.strerror or exc}); check the file") from None
        if not records:
            raise DataError(f"{path} holds no records; add examples to it")
        return records
    if not HUB_NAME.fullmatch(source):
        raise DataError(
            f"data {source} not found; pass a local file ({', '.join(DATA_SUFFIXES)}), a hub dataset or a built-in "
            f"one ({', '.join(BUILT_IN)})"
        )
    return _read_hub(source, split)


# Text files are read as utf-8-sig: a UTF-8 byte-order mark (as Windows editors write) is dropped, not read as data.


def _read_jsonl(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8 JSON Lines (one JSON object per line)") from None
    records = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number} is not a JSON object; each line must be one record")
        records.append(record)
    return records


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg}); fix the file") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8 JSON") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}); got {type(data).__name__}")
    return data


def _read_csv(path: Path) -> list[dict]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            rows = []
            for row in reader:
                if None in row:  # more cells than the header names
                    raise DataError(
                        f"{path}: line {reader.line_num} has more fields than the header ({len(reader.fieldnames)}); "
                        "fix that line or quote fields that hold commas"
                    )
                rows.append(dict(row))
            return rows
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc}); fix the file") from None


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow") from None
    except Exception as exc:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None


def _read_txt(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    documents = [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]
    return [{"text": doc} for doc in documents]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}


def _read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets

        dataset = datasets.load_dataset(name, split="test" if split == "eval" else split)
    except Exception as exc:  # datasets raises many types (network, missing split, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"hub dataset {name!r} could not be loaded ({first[:200]}); pass a local file instead"
        ) from None
    return [dict(r) for r in dataset]
