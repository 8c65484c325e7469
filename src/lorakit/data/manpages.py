"""`manpages-summaries`: a built-in instruction dataset built from the C library and system-call manual pages
(Debian / Ubuntu package `manpages-dev`: /usr/share/man/man2 and man3, gzip-compressed troff) on this machine.

instruction = INSTRUCTION (fixed)
input       = the page's SYNOPSIS as plain text: the #include lines and the prototypes (or type / constant
              declarations), without the "Feature Test Macro Requirements" part
output      = the page's one-line summary, the text after "\\-" in its NAME section
              (open.2: "open and possibly create a file")

So the task is "what does this interface do, given its declaration": natural-language summaries of C code, a
different kind of data from stdlib-docstrings' Python.

One record per page file. A page documents several names (open.2: open, openat, creat) and is reached through
aliases (symlinks such as creat.2.gz -> open.2.gz, and `.so man2/open.2` stub pages): aliases are resolved to the
page they point to and never make records of their own; stubs that point outside man2/man3 (to man7 overviews) are
left out. Pages without a synopsis, or with one longer than MAX_SYNOPSIS_CHARS (so that examples fit in
--max-length 256), are left out. Only pages of the Linux man-pages project are read (their `.TH` line names it), so other packages' section
3 pages in the same directory (Perl, X11, util-linux, ...) are not mixed in; `intro` pages are skipped.

Train / eval split, deterministic and leak-free: pages are grouped when they share a name in their NAME lines or
share the same summary (union-find), and a whole group goes to eval when a hash of its first page's key falls in
one bucket of EVAL_BUCKETS. So no function name and no answer appears in both splits, and the same installed
package always gives the same split. Built once per machine and cached as JSON in the lorakit cache, keyed by the
directory, a fingerprint of its listing (names, sizes, modification times) and VERSION.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
from pathlib import Path

from ..atomic import write_json
from ..errors import DataError

NAME = "manpages-summaries"
DEFAULT_ROOT = "/usr/share/man"
ROOT_ENV = "LORAKIT_MANPAGES"  # another man directory (holding man2/ and man3/), e.g. on a non-Debian system
SECTIONS = ("man2", "man3")
INSTRUCTION = "Write the one-line man-page summary of the C interface declared in this synopsis."
EVAL_BUCKETS = 5  # about one page group in five goes to eval
MAX_SYNOPSIS_CHARS = 600  # keeps 850 of 878 pages (manpages-dev 6.03); all but 6 fit in 256 SmolLM2 tokens
MIN_SUMMARY_CHARS, MAX_SUMMARY_CHARS = 5, 200
VERSION = 2  # bump when the generation rules change (invalidates cached copies)
PAGE_FILE = re.compile(r"(?P<stem>.+)\.(?P<section>[23][a-z]*)(?:\.gz)?")
PROJECT_MARKERS = ("Linux man-pages", '"Linux Programmer')  # 6.x `.TH` source field; 5.x manual field

# troff special characters \(xx and \[name] that occur in these pages, as plain ASCII
SPECIAL = {
    "em": "--", "en": "-", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'",
    "cq": "'", "ti": "~", "ha": "^", "rs": "\\", "bu": "*", "co": "(C)", "mu": "x", "tm": "(TM)", "rg": "(R)",
    "Fo": "<<", "Fc": ">>", "fo": "<", "fc": ">", "ga": "`", "ua": "^", "da": "v", "<=": "<=", ">=": ">=",
    "!=": "!=", "==": "==", "pl": "+", "eq": "=", "sl": "/", "ba": "|", "br": "|", "lB": "[", "rB": "]",
    "lC": "{", "rC": "}", "at": "@", "sh": "#", "Do": "$", "pc": ".", "de": "deg", "+-": "+-", "->": "->",
    "<-": "<-", "ss": "ss", "OK": "OK", "ul": "_", "ru": "_", "bv": "|", "ct": "c", "Po": "L", "Ye": "Y",
}  # fmt: skip
ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\(..|.)"  # font change: \fB \fI \fR \fP \f(CW \f[B]
    r"|\((?P<two>..)"  # \(xx
    r"|\[(?P<name>[^\]]*)\]"  # \[name]
    r"|\*(?:\[[^\]]*\]|\(..|.)"  # string interpolation: dropped
    r"|s[-+]?(?:\d|\(\d\d|\[\d+\])"  # size change
    r"|(?P<char>.)"  # one-character escapes
    r")"
)
ONE_CHAR = {"-": "-", "e": "\\", "\\": "\\", "~": " ", " ": " ", "0": " ", "t": " ", "'": "'", "`": "`", ".": "."}
ALTERNATING = {"BI", "IB", "BR", "RB", "IR", "RI"}  # arguments joined without spaces
FONT = {"B", "I", "R", "SM", "SB"}  # arguments joined with spaces
BREAKS = {"PP", "P", "LP", "sp", "TP", "IP", "HP", "SS"}  # a paragraph break in the synopsis


def _unescape(text: str) -> str:
    def replace(match: re.Match) -> str:
        if match["two"] is not None:
            return SPECIAL.get(match["two"], "")
        if match["name"] is not None:
            return SPECIAL.get(match["name"], "")
        if match["char"] is not None:
            return ONE_CHAR.get(match["char"], "")
        return ""  # fonts, strings, sizes

    return ESCAPE.sub(replace, text)


def _arguments(text: str) -> list[str]:
    """A macro line's arguments: blank-separated, double quotes group ("" inside quotes is a quote)."""
    args, i = [], 0
    while i < len(text):
        if text[i] in " \t":
            i += 1
            continue
        if text[i] == '"':
            i += 1
            chunk = []
            while i < len(text):
                if text[i] == '"':
                    if text[i + 1 : i + 2] == '"':
                        chunk.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                chunk.append(text[i])
                i += 1
            args.append("".join(chunk))
        else:
            end = i
            while end < len(text) and text[end] not in " \t":
                end += 1
            args.append(text[i:end])
            i = end
    return args


def _logical_lines(source: str) -> list[str]:
    """Source lines with `\\` + newline continuations joined and comment lines (.\\" and \\") removed."""
    lines, pending = [], ""
    for raw in source.splitlines():
        if raw.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        raw = re.sub(r'\\".*$', "", raw)  # trailing comment
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            pending += raw[:-1]
            continue
        if raw.endswith("\\c"):
            pending += raw[:-2]
            continue
        lines.append(pending + raw)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def _sections(lines: list[str]) -> dict[str, list[str]]:
    """The lines under each .SH heading (the first occurrence of each)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in lines:
        if line.startswith(".SH"):
            current = _unescape(" ".join(_arguments(line[3:]))).strip().upper()
            if current in sections:
                current = None  # a repeated heading: keep the first
            else:
                sections[current] = []
            continue
        if current is not None:
            sections[current].append(line)
    return sections


def _to_text(lines: list[str]) -> list[str]:
    """troff lines to plain text lines; paragraph breaks become empty lines."""
    out = []
    for line in lines:
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro in ALTERNATING:
                out.append(_unescape("".join(_arguments(rest))))
            elif macro in FONT:
                out.append(_unescape(" ".join(_arguments(rest))))
            elif macro in BREAKS:
                out.append("")
            continue  # any other request (.nf, .fi, .in, .RS, .EX, ...) carries no text here
        out.append(_unescape(line))
    return out


def _summary(name_lines: list[str]) -> tuple[list[str], str] | None:
    """(names, summary) from the NAME section: "open, openat, creat \\- open and possibly create a file"."""
    text = " ".join(part.strip() for part in _to_text(name_lines) if part.strip())
    names, sep, summary = text.partition(" - ")
    if not sep:
        return None
    names_list = [n.strip() for n in names.split(",") if n.strip()]
    summary = " ".join(summary.split())
    return (names_list, summary) if names_list and summary else None


def _synopsis(lines: list[str]) -> str:
    text_lines = []
    for line in _to_text(lines):
        if line.strip().startswith("Feature Test Macro Requirements"):
            break
        text_lines.append(line.rstrip())
    text = "\n".join(text_lines)
    text = re.sub(r"\n\s*\n+", "\n\n", text)  # one empty line between paragraphs at most
    return text.strip()


def parse_page(source: str) -> dict | None:
    """{"names", "summary", "synopsis"} of one Linux man-pages page, or None if it is not one (another project's
    page, no NAME line) or an alias stub."""
    lines = _logical_lines(source)
    title = next((line for line in lines if line.startswith(".TH")), "")
    if not any(marker in title for marker in PROJECT_MARKERS):
        return None
    sections = _sections(lines)
    parsed = _summary(sections.get("NAME", []))
    if parsed is None:
        return None
    names, summary = parsed
    return {"names": names, "summary": summary, "synopsis": _synopsis(sections.get("SYNOPSIS", []))}


def _read(path: Path) -> str:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _so_target(text: str, root: Path) -> Path | None:
    """The file a `.so manN/page.N` stub page points to (None for an ordinary page)."""
    for line in text.splitlines()[:40]:
        if line.startswith('.\\"') or not line.strip():
            continue
        if line.startswith(".so "):
            relative = line[4:].strip()
            for candidate in (root / relative, root / (relative + ".gz")):
                if candidate.exists():
                    return candidate.resolve()
            return root / relative  # a dangling stub: left out below
        return None
    return None


def _candidates(root: Path) -> list[Path]:
    files = []
    for section in SECTIONS:
        directory = root / section
        if directory.is_dir():
            files += [p for p in directory.iterdir() if PAGE_FILE.fullmatch(p.name)]
    return sorted(files, key=lambda p: (p.parent.name, p.name))


def _pages(root: Path) -> dict[str, dict]:
    """Every canonical page under root, keyed by "man2/open.2", with its parsed fields and its aliases."""
    sections = {(root / s).resolve() for s in SECTIONS}
    pages: dict[str, dict] = {}
    aliases: dict[Path, list[str]] = {}
    for path in _candidates(root):
        target = path.resolve()
        label = f"{path.parent.name}/{path.name.removesuffix('.gz')}"
        if not target.is_file():
            continue  # a dangling symlink
        if path.is_symlink():  # an alias of the page it points to
            aliases.setdefault(target, []).append(label)
            continue
        try:
            text = _read(path)
        except (OSError, EOFError, gzip.BadGzipFile):
            continue  # an unreadable or truncated page: left out
        stub = _so_target(text, root)
        if stub is not None:
            aliases.setdefault(stub, []).append(label)
            continue
        parsed = parse_page(text)
        if parsed is None or PAGE_FILE.fullmatch(path.name)["stem"] == "intro":
            continue
        pages[label] = {**parsed, "path": target, "aliases": []}
    by_path = {page["path"]: label for label, page in pages.items()}
    for target, labels in aliases.items():
        if target.parent in sections and target in by_path:  # aliases into man7 etc. are left out
            pages[by_path[target]]["aliases"] += labels
    return pages


def _groups(pages: dict[str, dict]) -> dict[str, str]:
    """page -> the first page (sorted) of its group: pages sharing a name or a summary are one group."""
    parent = {label: label for label in pages}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_with: dict[str, str] = {}
    for label in sorted(pages):
        page = pages[label]
        keys = [f"name:{n}" for n in page["names"]] + [f"summary:{page['summary'].lower()}"]
        for key in keys:
            other = first_with.setdefault(key, label)
            a, b = find(label), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {label: find(label) for label in pages}


def is_eval_group(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % EVAL_BUCKETS == 0


def _generate(root: str) -> tuple[list[dict], list[dict]]:
    pages = _pages(Path(root))
    groups = _groups(pages)
    train, evaluation = [], []
    for label in sorted(pages):
        page = pages[label]
        synopsis, summary = page["synopsis"], page["summary"]
        if not synopsis or len(synopsis) > MAX_SYNOPSIS_CHARS:
            continue
        if not MIN_SUMMARY_CHARS <= len(summary) <= MAX_SUMMARY_CHARS:
            continue
        record = {
            "instruction": INSTRUCTION,
            "input": synopsis,
            "output": summary,
            "page": label,
            "names": page["names"],
            "aliases": sorted(page["aliases"]),
            "group": groups[label],
        }
        (evaluation if is_eval_group(groups[label]) else train).append(record)
    return train, evaluation


def _fingerprint(root: Path) -> str:
    digest = hashlib.sha256(f"{VERSION}:{root.resolve()}".encode())
    for path in _candidates(root):
        try:
            info = path.lstat()
            link = os.readlink(path) if path.is_symlink() else ""
        except OSError:
            continue
        digest.update(f"{path.parent.name}/{path.name}:{info.st_size}:{info.st_mtime_ns}:{link}\n".encode())
    return digest.hexdigest()[:16]


def missing_message(root: Path) -> str:
    return (
        f"{NAME} is built from the C library manual pages in {root}/man2 and {root}/man3, which are not installed; "
        f"install them with: apt-get install manpages-dev (or set {ROOT_ENV} to a directory holding man2/ and man3/)"
    )


@functools.lru_cache(maxsize=4)
def _all_records(root: str, fingerprint: str) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    from ..models import cache_dir

    cached = cache_dir() / "datasets" / f"{NAME}-{fingerprint}.json"
    if cached.is_file():
        try:
            data = json.loads(cached.read_text())
            return tuple(data["train"]), tuple(data["eval"])
        except (OSError, ValueError, KeyError):
            pass  # regenerate below
    train, evaluation = _generate(root)
    if not train or not evaluation:
        raise DataError(
            f"{NAME}: {root} holds {len(train) + len(evaluation)} usable Linux man-pages pages in man2/man3; "
            "install them with: apt-get install manpages-dev"
        )
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json(cached, {"train": train, "eval": evaluation})
    except OSError:
        pass  # caching only saves time
    return tuple(train), tuple(evaluation)


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def load(split: str = "train", root: str | os.PathLike | None = None) -> list[dict]:
    """Records of the given split ("train" or "eval") as instruction / input / output dicts (plus the page, its
    names, its aliases and its group, for inspection)."""
    base = Path(root) if root is not None else default_root()
    if not any((base / section).is_dir() for section in SECTIONS):
        raise DataError(missing_message(base))
    train, evaluation = _all_records(str(base), _fingerprint(base))
    return [dict(r) for r in (train if split == "train" else evaluation)]
