"""Docs inside the repo: every relative link in README.md and docs/ resolves to a file in git."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links(results: bool) -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z+]+://|#|mailto:", target):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if rel.startswith("docs/results/") == results:
                out.append((doc.name, rel))
    return out


def _tracked() -> set[str] | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    files = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    return set(files) | {str(Path(f).parent) for f in files}


def _missing(links: list[tuple[str, str]]) -> list[str]:
    tracked = _tracked()
    return [
        f"{doc} -> {rel}"
        for doc, rel in links
        if not (ROOT / rel).exists() or (tracked is not None and rel not in tracked)
    ]


def test_links_resolve_to_files_in_the_repo():
    links = _links(results=False)
    assert ("README.md", "docs/ARCHITECTURE.md") in links
    assert _missing(links) == []


def test_results_links_resolve_to_committed_runs():
    links = _links(results=True)
    assert links and _missing(links) == []


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_anchors_name_a_heading_of_their_page():
    bad = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z+]+://|mailto:", target) or "#" not in target:
                continue
            page, anchor = target.split("#", 1)
            path = (doc.parent / page).resolve() if page else doc
            if path.suffix != ".md" or not path.exists():
                continue
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                bad.append(f"{doc.name} -> {target}")
    assert bad == []


def test_readme_is_a_guide_of_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
