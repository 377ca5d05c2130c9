"""The README stays short, and every relative link in README.md and docs/*.md resolves.

Pure and fast: reads Markdown files only, no network.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_MAX_CHARS = 10_000
MARKDOWN_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) or ![alt](target); the target may carry a "title" after a space.
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(INLINE_CODE.sub("", line))
    return lines


def links(text: str) -> list[str]:
    return [m.group(1) for line in prose_lines(text) for m in LINK.finditer(line)]


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_anchor(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(md: Path) -> list[str]:
    problems = []
    for target in links(md.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = md if not path_part else md.parent / path_part
        if not dest.exists():
            problems.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    return problems


def test_readme_is_under_the_size_limit() -> None:
    n = len(README.read_text(encoding="utf-8"))
    assert n < README_MAX_CHARS, f"README.md has {n} characters; keep it under {README_MAX_CHARS}"


def test_readme_mentions_the_fast_test_tier() -> None:
    assert "make test-fast" in README.read_text(encoding="utf-8")


@pytest.mark.parametrize("md", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path) -> None:
    assert broken_links(md) == []


def test_the_link_checker_catches_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## Exit codes\n", encoding="utf-8")
    md = tmp_path / "page.md"
    md.write_text(
        "# Page\n"
        "[ok](other.md) [ok](other.md#exit-codes) [ok](#page) [web](https://example.com/x)\n"
        "`[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#nope) ![img](img/none.png)\n",
        encoding="utf-8",
    )
    assert broken_links(md) == [
        f"missing.md: {tmp_path / 'missing.md'} does not exist",
        "other.md#nope: no heading #nope in other.md",
        f"img/none.png: {tmp_path / 'img' / 'none.png'} does not exist",
    ]


def test_github_anchors() -> None:
    assert github_anchor("Checkpoints, resume, stopping and failures") == "checkpoints-resume-stopping-and-failures"
    assert github_anchor("Where (c)'s time goes") == "where-cs-time-goes"
    assert github_anchor("The `base:` key") == "the-base-key"
