"""Links between the README, docs/ and benchmarks/README.md lead somewhere: the file exists and,
for ``page.md#section``, a heading of that page has that anchor (GitHub's rule)."""

from __future__ import annotations

import re

from tests.fixtures import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def anchor_of(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_and_anchor_exists() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md":
                anchors = {anchor_of(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}
                if anchor not in anchors:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such section)")
    assert not broken, "\n".join(broken)


def test_the_anchor_rule_matches_githubs() -> None:
    assert anchor_of("Augmentation chosen from your images (`augment=auto`)") == (
        "augmentation-chosen-from-your-images-augmentauto"
    )
