"""Every Python block of README.md and docs/*.md runs as written (each block in a fresh namespace,
in a fresh process so that a block's ``torch._dynamo`` settings stay its own), and every relative
link of those documents points at a file of the repository."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def blocks():
    return [pytest.param(doc, index, code, id=f"{doc.name}[{index}]")
            for doc in DOCUMENTS for index, code in enumerate(BLOCK.findall(doc.read_text()))]


def test_documents_have_python_blocks():
    counted = {doc.name: len(BLOCK.findall(doc.read_text())) for doc in DOCUMENTS}
    assert counted["README.md"] >= 3 and counted["TRAINING.md"] >= 4, counted
    assert {"MATH.md", "TRAINING.md", "DROP_IN.md", "RESULTS.md"} <= set(counted)


@pytest.mark.parametrize("doc, index, code", blocks())
def test_python_block_runs(doc, index, code):
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{doc.name} block {index} failed:\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda doc: doc.name)
def test_relative_links_stay_in_the_repository(doc):
    for target in LINK.findall(doc.read_text()):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.is_relative_to(REPO) and path.exists(), f"{doc.name}: broken link {target}"
        if anchor:
            assert anchor in heading_anchors(path), f"{doc.name}: no heading for {target}"


def heading_anchors(path):
    """The anchors of a Markdown file's headings, as GitHub makes them (lower case, spaces to
    hyphens, punctuation dropped)."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in headings}
