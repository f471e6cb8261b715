"""Who may import whom, read from the sources with ``ast``: the bench (``bench/``) is a leaf that
nothing outside it imports but its own tests (``tests/test_bench_*.py``) and two tools built on it
(the README generator reads its sentences, the H100 model its cases), its modules import each
other and ``tools`` without a cycle, and the package's counters (``gkl_kernels.testing``) are not
imported by ``import gkl_kernels``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_layering import cycles, import_graph, imports_of, package_modules

REPO = Path(__file__).resolve().parents[1]
OUTSIDE_BENCH = ("gkl_kernels", "reference", "tests", "tools", "examples")
# the bench's own tests, in tests/ beside the package's
BENCH_TESTS = {f"tests/test_bench_{name}.py" for name in ("loss", "fused_linear", "traffic",
                                                          "command")}
# tools/readme.py writes the README summary and docs/RESULTS.md from the bench's JSON in the
# bench's own sentences (bench.report, bench.overhead); tools/h100_model.py models the step that
# bench.traffic counts (its case from bench.cases, its sentences in bench.report's units)
BENCH_IMPORTERS = {"tools/readme.py", "tools/h100_model.py", *BENCH_TESTS}

pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once


def imported_modules(path, package):
    """The absolute names of the modules ``path`` imports (function-level imports too), a
    relative import resolved in ``package`` (dotted); ``from a import b`` gives ``a`` and
    ``a.b``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = ".".join(part for part in (parent, base) if part)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def bench_importers(root):
    """The ``.py`` files under ``root``'s folders ``OUTSIDE_BENCH`` that import ``bench``."""
    found = []
    for folder in OUTSIDE_BENCH:
        for path in sorted((root / folder).rglob("*.py")):
            package = ".".join(path.parent.relative_to(root).parts)
            if any(name == "bench" or name.startswith("bench.")
                   for name in imported_modules(path, package)):
                found.append(path.relative_to(root).as_posix())
    return found


def import_cycles(package_dir):
    """The import cycles among the modules of the package in ``package_dir`` (one folder, no
    subpackages): each as the list of module names around it, the first repeated last."""
    graph = import_graph(package_dir.parent, package_dir.name)
    return [[name.split(".")[-1] for name in cycle] for cycle in cycles(graph)]


def test_nothing_outside_the_bench_imports_it():
    """Tests (``tests/``, ``tools/gpu_tests.py``), tools, examples and the package import the
    counters from ``gkl_kernels.testing``; only the bench's own tests (``tests/test_bench_*.py``),
    the README generator and the H100 model import ``bench``."""
    found = bench_importers(REPO)
    assert set(found) <= BENCH_IMPORTERS, found
    assert BENCH_TESTS <= set(found)  # they exist, and tests/ is scanned
    assert (REPO / "tests" / "test_traffic_counters.py").is_file()  # scanned, not vacuous


def test_a_bench_import_is_found(tmp_path):
    for folder, source in (("tests", "def f():\n    from bench.traffic import count_case\n"),
                           ("tools", "import bench.cases as cases\n"),
                           ("examples", "from bench import report\n"),
                           ("gkl_kernels", "from .bench import report\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.py").write_text(source)
    (tmp_path / "reference").mkdir()
    (tmp_path / "tools" / "ok.py").write_text("import benchmarks\nfrom gkl_kernels import bench\n")
    assert bench_importers(tmp_path) == ["tests/x.py", "tools/x.py", "examples/x.py"]


def test_bench_modules_import_each_other_without_a_cycle():
    assert import_cycles(REPO / "bench") == []


def joint_import_graph(root, packages):
    """``import_graph`` of the folders ``packages`` (names such as ``bench``) together: ``{module:
    the modules of any of them it imports}``."""
    modules = {}
    for package in packages:
        modules.update(package_modules(root, package))
    graph = {}
    for name, path in modules.items():
        targets = set()
        for base, names in imports_of(path, name, path.name == "__init__.py"):
            submodules = {f"{base}.{n}" for n in names} & modules.keys()
            targets |= submodules or {base} & modules.keys()
        graph[name] = targets - {name}
    return graph


def test_bench_and_tools_import_each_other_without_a_cycle():
    """The bench imports the H100 model from ``tools``, which imports the bench's cases and
    units (as the README generator imports its sentences): never both ways round."""
    graph = joint_import_graph(REPO, ("bench", "tools"))
    assert "tools.h100_model" in graph["bench.traffic"]  # not vacuous
    assert "bench.cases" in graph["tools.h100_model"]
    assert cycles(graph) == []


def test_a_cycle_between_two_folders_is_found(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
    (tmp_path / "one" / "a.py").write_text("from two import b\n")
    (tmp_path / "two" / "b.py").write_text("def f():\n    import one.a\n")
    assert cycles(joint_import_graph(tmp_path, ("one", "two"))) == [["one.a", "two.b", "one.a"]]


def test_an_import_cycle_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("from pkg.b import f\n")
    (package / "b.py").write_text("def g():\n    from pkg import c\n")
    (package / "c.py").write_text("from .a import h\nimport pkg.d\n")
    (package / "d.py").write_text("import os\n")
    assert import_cycles(package) == [["a", "b", "c", "a"]]
    (package / "c.py").write_text("import pkg.d\n")
    assert import_cycles(package) == []


def test_the_counters_are_not_imported_with_the_package():
    code = ("import sys, gkl_kernels; "
            "print(sorted(m for m in sys.modules if m.startswith('gkl_kernels.testing')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
