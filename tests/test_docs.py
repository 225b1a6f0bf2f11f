"""The user documents (README.md, docs/*.md, dataset/README.md) hold together: every relative link and image
resolves to a file of the repository, every `#anchor` to a heading of its target, and none names an issue number
or a path outside the repository. The README stays short enough to read in ten minutes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "dataset" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (a `[x](y)` there is code, not a link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-', repeats -1, -2..."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(doc: Path) -> list[str]:
    bad = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if REPO not in file.parents and file != REPO:
            bad.append(f"{target} (outside the repository)")
        elif not file.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            bad.append(f"{target} (no such heading)")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_issue_numbers_or_outside_paths(doc):
    text = doc.read_text()
    assert re.findall(r".{0,30}[Ii]ssue #?\d+.{0,10}", text) == []
    assert "../shared" not in text


def test_link_checker_sees_broken_links(tmp_path, monkeypatch):
    """The checker itself: a missing file, a missing heading and a path outside the repository are each caught;
    code is not read as a link."""
    doc = REPO / "docs" / "evaluation.md"
    text = (
        "# A title\n\n## `--flag` and (more)\n\n[ok](#a-title) [ok](#--flag-and-more) [ok](../README.md#evaluation)\n"
        "[x](nowhere.md) [y](#no-heading) [z](../README.md#no-heading) ![w](../../outside.png)\n"
        "`[code](nowhere.md)`\n```\n[code](nowhere.md)\n```\n"
    )
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text if self == doc else _read(self))
    assert broken_links(doc) == [
        "nowhere.md (no such file)",
        "#no-heading (no such heading)",
        "../README.md#no-heading (no such heading)",
        "../../outside.png (outside the repository)",
    ]


_read = Path.read_text


def test_readme_reads_in_ten_minutes():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
