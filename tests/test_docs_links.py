"""Every cross-reference in the project's Markdown resolves: the file exists and so does the heading it names."""

import re

from conftest import ROOT

SKIPPED_DIRECTORIES = {".venv", ".tools", "node_modules", "artifacts", ".git", ".pytest_cache"}
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def pages():
    return [path for path in ROOT.rglob("*.md") if not SKIPPED_DIRECTORIES & set(path.relative_to(ROOT).parts)]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation but hyphens and spaces dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    found, counts = set(), {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        counts[base] = counts.get(base, -1) + 1
        found.add(base if counts[base] == 0 else f"{base}-{counts[base]}")
    return found


def broken_links(path):
    """Each link of ``path`` that leads nowhere: ``<target> (<why>)``."""
    for match in LINK.finditer(FENCE.sub("", path.read_text())):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            yield f"{target} (no such file)"
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            yield f"{target} (no such heading)"


def test_every_markdown_link_resolves_to_a_file_and_a_heading():
    assert len(pages()) >= 10
    broken = [f"{path.relative_to(ROOT)}: {problem}" for path in pages() for problem in broken_links(path)]
    assert broken == []


def test_the_link_checker_sees_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## A `coded` heading (with words)\n\n[ok](#a-coded-heading-with-words) "
        "[gone](missing.md) [no heading](#nowhere) [web](https://example.org)\n"
    )
    assert list(broken_links(page)) == ["missing.md (no such file)", "#nowhere (no such heading)"]


def test_no_page_cites_an_issue_number_instead_of_a_reason():
    cited = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in pages()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bissues? \d+\b", line, re.I) and "tests/peers" not in str(path)
    ]
    assert cited == []
