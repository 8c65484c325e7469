"""`manpages-summaries`: built from man2/man3 troff pages (fake ones in a temporary directory, and the installed
manpages-dev package when present), one record per page, aliases resolved, a split that cannot leak, cached."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lorakit.data import manpages, read_records
from lorakit.errors import DataError

HEADER = '.TH {title} {section} 2023-02-05 "Linux man-pages 6.03"\n'

OPEN = (
    '.\\" SPDX-License-Identifier: Linux-man-pages-copyleft\n'
    + HEADER.format(title="open", section=2)
    + """.SH NAME
open, openat, creat \\- open and possibly create a file
.SH LIBRARY
Standard C library
.SH SYNOPSIS
.nf
.B #include <fcntl.h>
.PP
.BI "int open(const char *" pathname ", int " flags );
.BI "int openat(int " dirfd ", const char *" pathname ", int " flags \\
", mode_t " mode );
.PP
.BI "int creat(const char *" pathname ", mode_t " mode );
.fi
.PP
.RS -4
Feature Test Macro Requirements for glibc (see
.BR feature_test_macros (7)):
.RE
.SH DESCRIPTION
The
.BR open ()
system call opens the file specified by
.IR pathname .
"""
)


def page(title: str, section: str, names: str, summary: str, synopsis: str, th: str | None = None) -> str:
    return (
        th or HEADER.format(title=title, section=section)
    ) + f".SH NAME\n{names} \\- {summary}\n.SH SYNOPSIS\n.nf\n{synopsis}\n.fi\n.SH DESCRIPTION\nText.\n"


def write(root: Path, relative: str, text: str) -> Path:
    path = root / (relative + ".gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    manpages._all_records.cache_clear()
    yield tmp_path / "cache"
    manpages._all_records.cache_clear()


@pytest.fixture
def man_root(tmp_path, cache):
    root = tmp_path / "man"
    write(root, "man2/open.2", OPEN)
    (root / "man2" / "creat.2.gz").symlink_to("open.2.gz")  # a symlink alias
    write(root, "man2/openat.2", '.\\" a stub\n.so man2/open.2\n')  # a .so alias
    write(root, "man3/queue.3", ".so man7/queue.7\n")  # points outside man2/man3: left out
    write(root, "man7/queue.7", page("queue", "7", "queue", "implementations of linked lists", "none"))
    write(root, "man3/intro.3", page("intro", "3", "intro", "introduction to library functions", "none"))
    other = '.TH "UUID" "3" "2022-05-11" "util\\-linux 2.38.1" "Programmer\\(aqs Manual"\n'
    write(root, "man3/uuid.3", page("uuid", "3", "uuid", "DCE compatible UUID library", "#include <uuid.h>", other))
    # an overview page sharing names with two pages (and so its synopsis with theirs): one group
    write(root, "man3/string.3", page("string", "3", "strcpy, strlen", "string operations", "char *strcpy();"))
    write(root, "man3/strcpy.3", page("strcpy", "3", "strcpy", "copy a string", "char *strcpy(char *d);"))
    write(root, "man3/strlen.3", page("strlen", "3", "strlen", "calculate the length of a string", "size_t strlen();"))
    # two pages with the same summary: one group
    write(
        root, "man3/ecvt.3", page("ecvt", "3", "ecvt", "convert a floating-point number to a string", "char *ecvt();")
    )
    write(
        root, "man3/gcvt.3", page("gcvt", "3", "gcvt", "convert a floating-point number to a string", "char *gcvt();")
    )
    for i in range(40):  # enough independent pages for both splits
        write(root, f"man3/fn{i}.3", page(f"fn{i}", "3", f"fn{i}", f"do thing number {i}", f"int fn{i}(void);"))
    return root


def test_a_page_becomes_one_record_with_its_synopsis_and_summary(man_root):
    train, evaluation = manpages._generate(str(man_root))
    records = {r["page"]: r for r in train + evaluation}
    record = records["man2/open.2"]
    assert record["instruction"] == manpages.INSTRUCTION
    assert record["output"] == "open and possibly create a file"
    assert record["names"] == ["open", "openat", "creat"]
    assert record["input"] == (
        "#include <fcntl.h>\n\n"
        "int open(const char *pathname, int flags);\n"
        "int openat(int dirfd, const char *pathname, int flags, mode_t mode);\n\n"
        "int creat(const char *pathname, mode_t mode);"
    )
    # aliases (a symlink and a .so stub) belong to the page and make no records of their own
    assert record["aliases"] == ["man2/creat.2", "man2/openat.2"]
    assert not {"man2/creat.2", "man2/openat.2", "man3/queue.3"} & records.keys()
    # another project's page, intro pages and man7 are not read
    assert not {"man3/uuid.3", "man3/intro.3"} & records.keys()
    assert len(records) == 1 + 3 + 2 + 40


def test_split_keeps_pages_sharing_a_name_or_a_summary_together_and_is_deterministic(man_root):
    train, evaluation = manpages._generate(str(man_root))
    assert train and evaluation
    group = {r["page"]: r["group"] for r in train + evaluation}
    assert group["man3/string.3"] == group["man3/strcpy.3"] == group["man3/strlen.3"]
    assert group["man3/ecvt.3"] == group["man3/gcvt.3"]
    for a, b in ((train, evaluation), (evaluation, train)):
        names = {n for r in a for n in r["names"]}
        assert not names & {n for r in b for n in r["names"]}
        assert not {r["output"] for r in a} & {r["output"] for r in b}
        assert not {r["group"] for r in a} & {r["group"] for r in b}
    assert manpages._generate(str(man_root)) == (train, evaluation)


def test_built_once_then_read_from_the_cache_and_rebuilt_when_pages_change(man_root, cache):
    train = manpages.load("train", root=man_root)
    evaluation = manpages.load("eval", root=man_root)
    assert len(train) + len(evaluation) == 46
    files = list((cache / "datasets").glob(f"{manpages.NAME}-*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["train"] == train
    manpages._all_records.cache_clear()
    files[0].write_text(json.dumps({"train": [{"instruction": "i", "output": "from the cache"}], "eval": []}))
    assert manpages.load("train", root=man_root)[0]["output"] == "from the cache"
    write(man_root, "man3/extra.3", page("extra", "3", "extra", "one more page", "int extra(void);"))
    assert len(manpages.load("train", root=man_root)) + len(manpages.load("eval", root=man_root)) == 47


def test_resolved_as_a_built_in_name(man_root, monkeypatch):
    monkeypatch.setenv(manpages.ROOT_ENV, str(man_root))
    assert read_records(manpages.NAME) == manpages.load("train", root=man_root)
    assert read_records(manpages.NAME, split="eval") == manpages.load("eval", root=man_root)
    with pytest.raises(DataError, match="takes no options"):
        read_records(manpages.NAME + ":x=1")


def test_missing_pages_give_one_line_naming_the_package(tmp_path, cache, monkeypatch):
    monkeypatch.setenv(manpages.ROOT_ENV, str(tmp_path / "nothing"))
    with pytest.raises(DataError) as error:
        read_records(manpages.NAME)
    message = str(error.value)
    assert "apt-get install manpages-dev" in message and "\n" not in message
    empty = tmp_path / "empty"
    (empty / "man2").mkdir(parents=True)
    with pytest.raises(DataError, match="apt-get install manpages-dev"):
        manpages.load("train", root=empty)


def test_troff_escapes_and_macros_become_plain_text():
    text = (
        HEADER.format(title="x", section=3)
        + ".SH NAME\nx, y \\- the \\fBbold\\fP \\(lqquoted\\(rq \\[ti]tilde\\[em]dash\n"
        + '.SH SYNOPSIS\n.nf\n.BR "#include <x.h>" "   " "/* a \\e comment */"\n'
        + '.BI "void x(int " n ", char " c [ "n" ]);\n.fi\n'
    )
    parsed = manpages.parse_page(text)
    assert parsed["names"] == ["x", "y"]
    assert parsed["summary"] == 'the bold "quoted" ~tilde--dash'
    assert parsed["synopsis"] == "#include <x.h>   /* a \\ comment */\nvoid x(int n, char c[n]);"


REAL = Path(manpages.DEFAULT_ROOT)


@pytest.mark.skipif(not (REAL / "man2" / "open.2.gz").is_file(), reason="manpages-dev is not installed")
def test_the_installed_manpages_dev_package(cache):
    train, evaluation = manpages.load("train", root=REAL), manpages.load("eval", root=REAL)
    assert len(train) > 500 and len(evaluation) > 50
    record = next(r for r in train + evaluation if r["page"] == "man2/open.2")
    assert record["output"] == "open and possibly create a file"
    assert "int open(const char *pathname, int flags);" in record["input"]
    assert "Feature Test Macro" not in record["input"]
    assert not any("\\f" in r["input"] or "\\-" in r["output"] for r in train + evaluation)
    pages = [r["page"] for r in train + evaluation]
    assert len(pages) == len(set(pages))
    assert not {n for r in train for n in r["names"]} & {n for r in evaluation for n in r["names"]}
    assert not {r["output"] for r in train} & {r["output"] for r in evaluation}
    regenerated = manpages._generate(str(REAL))
    assert (regenerated[0], regenerated[1]) == (train, evaluation)
