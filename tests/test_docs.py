"""Every Python block of README.md and docs/*.md runs as written (each block in a fresh namespace,
in a fresh process so that a block's ``torch._dynamo`` settings stay its own, as a reader runs it
on a CPU: without the suite's ``TRITON_INTERPRET``, so ``backend="auto"`` is the plain-PyTorch
path), every relative link of those documents points at a file of the repository, every document
cited in the code or the documents exists, and README's Layout names every module, example and
document."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
# where documents are cited: these folders' .py and .md files, and README.md
CITING = ("gkl_kernels", "reference", "bench", "tools", "examples", "tests", "docs")
# a path-like citation of a Markdown file (a name, a relative path), not in a URL or a pattern
CITATION = re.compile(r"(?<![\w/.*:{}$-])((?:[\w.-]+/)*\w[\w.-]*\.md)\b")
# a file named in the description column of README's Layout
NAMED_FILE = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.(?:py|md|sh))\b")


def blocks():
    return [pytest.param(doc, index, code, id=f"{doc.name}[{index}]")
            for doc in DOCUMENTS for index, code in enumerate(BLOCK.findall(doc.read_text()))]


def test_documents_have_python_blocks():
    counted = {doc.relative_to(REPO).as_posix(): len(BLOCK.findall(doc.read_text()))
               for doc in DOCUMENTS}
    assert counted["README.md"] >= 3 and counted["docs/TRAINING.md"] >= 4, counted
    assert {"docs/SPEC.md", "docs/MATH.md", "docs/TRAINING.md", "docs/DROP_IN.md",
            "docs/RESULTS.md"} <= set(counted)


@pytest.mark.end_to_end
@pytest.mark.parametrize("doc, index, code", blocks())
def test_python_block_runs(doc, index, code):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
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


def citations(root):
    """``(file, line number, cited path)`` for every path-like citation of a ``.md`` file in the
    ``.py`` and ``.md`` files of ``CITING`` under ``root``, and in its README.md outside the
    Layout (whose rows name files in their folders: ``layout_problems`` checks them)."""
    files = [root / "README.md"] + sorted(
        path for folder in CITING for pattern in ("*.py", "*.md")
        for path in (root / folder).rglob(pattern) if "__pycache__" not in path.parts)
    for path in files:
        if not path.is_file():
            continue
        in_layout = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if path == root / "README.md" and line.startswith("## "):
                in_layout = line.strip() == "## Layout"
            for cited in [] if in_layout else CITATION.findall(line):
                yield path, number, cited


def citation_problems(root):
    """The citations under ``root`` that name no file of the repository: a cited path is read
    from the repository root or from the citing file's folder, as a relative link is."""
    root = root.resolve()
    problems = []
    for path, number, cited in citations(root):
        candidates = [(root / cited).resolve(), (path.parent / cited).resolve()]
        if not any(c.is_relative_to(root) and c.is_file() for c in candidates):
            problems.append(f"{path.relative_to(root)}:{number}: {cited}")
    return problems


def test_cited_documents_exist():
    assert next(citations(REPO), None) is not None
    problems = citation_problems(REPO)
    assert not problems, "citations of missing documents:\n" + "\n".join(problems)


def test_a_missing_cited_document_is_reported(tmp_path):
    md = ".md"  # spelled apart: this file's own citations are checked too
    absent, present = f"SPEC{md}", f"docs/MATH{md}"
    write(tmp_path / present, f"Beside it: {absent}; in the same folder: MATH{md}.\n")
    write(tmp_path / "README.md", f"[the math]({present}), https://example.com/{absent}\n")
    write(tmp_path / "gkl_kernels" / "module.py",
          f'"""The loss ({absent}), see {present}; *.md files."""\n')
    write(tmp_path / "tests" / "test_x.py", f"# ../{present} is there, ../../{present} outside\n")
    assert citation_problems(tmp_path) == [
        f"docs/MATH.md:1: {absent}", f"gkl_kernels/module.py:1: {absent}",
        f"tests/test_x.py:1: ../../{present}"]


def layout_entries(readme):
    """``(path, description)`` for each row of README's ``## Layout`` block: a row starts at the
    block's indentation, a continuation line (indented further) adds to its description."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    entries = []
    for line in section.splitlines():
        if not line.startswith("    ") or not line.strip():
            continue
        if line[4] != " ":
            path, _, description = line[4:].partition(" ")
            entries.append([path, description.strip()])
        elif entries:
            entries[-1][1] += " " + line.strip()
    return [tuple(entry) for entry in entries]


def layout_problems(root):
    """What README's Layout gets wrong under ``root``: a path that does not exist (a row's path,
    or a file its description names: a bare name in the row's folder, a path from the root), and
    a module of ``gkl_kernels`` (``__init__.py`` aside), an example or a document that it does not
    name."""
    entries = layout_entries((root / "README.md").read_text())
    problems, named = [], set()
    for path, description in entries:
        folder = path if path.endswith("/") else path.rpartition("/")[0] + "/"
        exists = (root / path).is_dir() if path.endswith("/") else (root / path).is_file()
        if not exists:
            problems.append(f"no {path}")
        named.add(path)
        for name in NAMED_FILE.findall(description):
            file = name if "/" in name else (folder + name).lstrip("/")
            named.add(file)
            if not (root / file).is_file():
                problems.append(f"no {file} (named in the row of {path})")
    required = [*(root / "gkl_kernels").rglob("*.py"), *(root / "examples").glob("*.py"),
                *(root / "docs").glob("*.md")]
    for path in sorted(required):
        relative = path.relative_to(root).as_posix()
        if path.name != "__init__.py" and "__pycache__" not in path.parts and relative not in named:
            problems.append(f"{relative} not named")
    return problems


def test_layout_names_every_module_and_only_what_exists():
    assert layout_entries((REPO / "README.md").read_text())
    problems = layout_problems(REPO)
    assert not problems, "README.md's Layout:\n" + "\n".join(problems)


def test_a_wrong_layout_is_reported(tmp_path):
    md = ".md"  # spelled apart: this file's own citations are checked too
    for file in ("gkl_kernels/__init__.py", "gkl_kernels/loss.py", "gkl_kernels/extra.py",
                 "gkl_kernels/sub/__init__.py", "gkl_kernels/sub/kernel.py",
                 "gkl_kernels/sub/other.py", "examples/run.py", f"docs/A{md}", f"docs/B{md}"):
        write(tmp_path / file, "")
    write(tmp_path / "README.md", "\n".join([
        "# x", "", "## Layout", "",
        "    gkl_kernels/loss.py   the loss",
        "    gkl_kernels/gone.py   moved away",
        "    gkl_kernels/sub/      kernel.py (kernels),",
        "                          absent.py, examples/absent.py",
        "    examples/             run.py: a run", f"    docs/                 A{md}", "",
        "## Next", "", "    gkl_kernels/extra.py   not the Layout", ""]))
    assert layout_problems(tmp_path) == [
        "no gkl_kernels/gone.py", "no gkl_kernels/sub/absent.py (named in the row of "
        "gkl_kernels/sub/)", "no examples/absent.py (named in the row of gkl_kernels/sub/)",
        f"docs/B{md} not named", "gkl_kernels/extra.py not named",
        "gkl_kernels/sub/other.py not named"]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
