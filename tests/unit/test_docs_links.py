"""The documentation holds together: every relative link and anchor leads somewhere, every page is
reachable from the README (the settings tables are checked against the schemas in test_settings.py).

Anchors are GitHub's heading slugs: lower case, punctuation dropped, spaces as hyphens, a repeated
heading numbered ``-1``, ``-2``; headings and links inside code are not headings or links.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = ("README.md", "CHANGELOG.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
# The pages the README promises; each must exist and be linked from it.
REQUIRED_DOCS = (
    "api.md",
    "architecture.md",
    "configuration.md",
    "multi-host.md",
    "operations.md",
    "scheduling.md",
    "security.md",
    "troubleshooting.md",
)
# Settings read in common/config.py that are not the operator's to set.

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a Markdown text, repeated headings numbered as GitHub does."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in prose_lines(text):
        match = HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[str]:
    """The targets of the Markdown links and images outside code."""
    # Joined again, since a link's text may wrap onto the next line.
    return LINK.findall("\n".join(INLINE_CODE.sub("", line) for line in prose_lines(text)))


def broken_links(page: Path) -> list[str]:
    """What is wrong with each relative link of ``page``: a missing file or an anchor no heading has."""
    problems = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ... are not checked here
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading in {file.name} has the anchor #{anchor}")
    return problems


def test_headings_become_githubs_anchors() -> None:
    text = "# Multi-host: the balancer on host A, nodes on B and C\n## A node's own port\n## `/v0` and keys\n"
    text += "```\n# not a heading\n```\n## Errors\n## Errors\n"
    assert anchors(text) == {
        "multi-host-the-balancer-on-host-a-nodes-on-b-and-c",
        "a-nodes-own-port",
        "v0-and-keys",
        "errors",
        "errors-1",
    }


def test_a_missing_page_and_an_unknown_anchor_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\n## Keys\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#keys) [self](#here) [gone](c.md) [bad](a.md#locks) [web](https://example.com/x#y)\n"
        "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n# Here\n[a wrapped\nlink](d.md)\n"
    )
    assert broken_links(page) == [
        f"c.md: no file {tmp_path / 'c.md'}",
        "a.md#locks: no heading in a.md has the anchor #locks",
        f"d.md: no file {tmp_path / 'd.md'}",
    ]


@pytest.mark.parametrize("name", PAGES)
def test_every_relative_link_and_anchor_leads_somewhere(name: str) -> None:
    assert broken_links(ROOT / name) == []


def test_the_readme_links_every_page_in_docs() -> None:
    linked = {target.partition("#")[0] for target in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert {f"docs/{name}" for name in REQUIRED_DOCS} <= pages
    assert pages - linked == set()
