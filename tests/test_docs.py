"""The documentation's links lead somewhere: every relative link or image in the markdown files exists.

CI runs on a clean clone, so a file that is linked but not committed (an ignored folder, a forgotten
`git add`) fails here, not only on a reader's screen.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "data/README.md", "notebooks/README.md", "results/HISTORY.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def relative_links(text: str) -> list[str]:
    targets = [t.split("#", 1)[0] for t in LINK.findall(text)]
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]  # not http:, https:, mailto:


def test_the_link_pattern_finds_relative_links_only():
    text = "see [the history](results/HISTORY.md#seeds), ![loss](results/a.png) and [torch](https://pytorch.org)"
    assert relative_links(text) == ["results/HISTORY.md", "results/a.png"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_exists(doc):
    path = ROOT / doc
    missing = [t for t in relative_links(path.read_text(encoding="utf-8")) if not (path.parent / t).exists()]
    assert not missing, f"{doc} links to files that are not in the repository: {missing}"
