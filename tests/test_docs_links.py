"""The README and the docs link only to files that exist: the reproduction's plots and reports are committed, and
a renamed results folder must not leave a dead image in the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# markdown links and images, and <img src="..."> tags; web addresses and in-page anchors are not files
LINK = re.compile(r"\]\(([^)\s]+)\)|<img[^>]*\bsrc=\"([^\"]+)\"")


def local_links(document: Path) -> list[str]:
    found = [a or b for a, b in LINK.findall(document.read_text())]
    return [link.split("#")[0] for link in found if not re.match(r"[a-z]+:|#", link)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_local_link_points_to_a_committed_file(document):
    missing = [link for link in local_links(document) if not (document.parent / link).exists()]
    assert not missing, f"{document.name} links to missing files: {missing}"


def test_the_readme_shows_both_datasets_pareto_plots():
    links = local_links(ROOT / "README.md")
    for dataset in ("stdlib-docstrings", "manpages-summaries"):
        assert f"docs/reproduction/{dataset}/pareto.png" in links
