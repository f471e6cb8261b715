"""The package's layers, read from its sources with ``ast``: no import cycle between its modules
or between its subpackages (the row ops above both weight families, which build on the core),
kernels free of the input checks, no module importing another's
private names, and one ``torch.distributed`` helper."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = ("kernels.py", "per_row_kernels.py", "shared_kernels.py")

pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once


def module_name(root, path):
    """``gkl_kernels.rank1.kernels`` for ``root/gkl_kernels/rank1/kernels.py``; a package's
    ``__init__.py`` is the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root, package):
    """``{module name: path}`` of every ``.py`` file of ``root/package``."""
    return {module_name(root, path): path for path in sorted((root / package).rglob("*.py"))}


def imports_of(path, name, is_package):
    """``(module, imported names)`` pairs of the file ``path`` of module ``name`` (function-level
    imports too; relative imports resolved): ``import a.b`` gives ``("a.b", ())``,
    ``from a import b, c`` gives ``("a", ("b", "c"))``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = ".".join(part for part in (parent, base) if part)
            found.append((base, tuple(alias.name for alias in node.names)))
    return found


def import_graph(root, package):
    """``{module: set of the package's modules it imports}``: ``from a import b`` is an edge to
    the module ``a.b`` where that is one, else to ``a``."""
    modules = package_modules(root, package)
    graph = {}
    for name, path in modules.items():
        targets = set()
        for base, names in imports_of(path, name, path.name == "__init__.py"):
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            if submodules:
                targets.update(submodules)
            elif base in modules:
                targets.add(base)
        graph[name] = targets - {name}
    return graph


def cycles(graph):
    """The cycles of a directed graph ``{node: successors}``, each as its nodes, the first
    repeated last (one per strongly connected group reached)."""
    found, done = [], set()

    def visit(node, trail):
        if node in trail:
            found.append(trail[trail.index(node):] + [node])
            return
        if node in done:
            return
        for other in sorted(graph.get(node, ())):
            visit(other, trail + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def unit_of(module, package):
    """The top-level module or subpackage of ``package`` that ``module`` belongs to."""
    return ".".join(module.split(".")[:2]) if module != package else package


def unit_graph(graph, package):
    """The import graph between the package's top-level modules and subpackages (the package's
    ``__init__``, which imports the public API, left out)."""
    units = {}
    for module, targets in graph.items():
        if module == package:
            continue
        source = unit_of(module, package)
        units.setdefault(source, set()).update(
            unit_of(t, package) for t in targets if t != package and unit_of(t, package) != source)
    return units


def test_no_import_cycle_between_modules():
    assert cycles(import_graph(REPO, "gkl_kernels")) == []


def test_no_import_cycle_between_subpackages_and_modules():
    """Above the modules: ``core``, ``rank1`` and ``pairs`` do not import each other both ways,
    and no top-level module and subpackage either."""
    units = unit_graph(import_graph(REPO, "gkl_kernels"), "gkl_kernels")
    assert "gkl_kernels.rank1" in units and "gkl_kernels.pairs" in units  # not vacuous
    assert cycles(units) == []


def test_both_weight_families_build_on_the_core():
    """``rank1`` and ``pairs`` import the core (layout, config, shared ``@triton.jit`` pieces);
    the core imports neither family."""
    units = unit_graph(import_graph(REPO, "gkl_kernels"), "gkl_kernels")
    assert "gkl_kernels.core" in units["gkl_kernels.rank1"]
    assert "gkl_kernels.core" in units["gkl_kernels.pairs"]
    assert "gkl_kernels.core" in units["gkl_kernels.jsd"]
    assert not {"gkl_kernels.rank1", "gkl_kernels.pairs", "gkl_kernels.jsd"} & units.get(
        "gkl_kernels.core", set())


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for other in graph.get(todo.pop(), ()):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return seen


def test_kernels_import_nothing_from_the_input_checks():
    graph = import_graph(REPO, "gkl_kernels")
    kernels = [m for m, path in package_modules(REPO, "gkl_kernels").items()
               if path.name in KERNEL_FILES]
    assert len(kernels) == 5  # core, rank1, jsd, pairs' two
    for module in kernels:
        assert "gkl_kernels.validation" not in reachable(graph, module), module


def private_imports(root, package):
    """``(module, imported module, name)`` of every ``from X import _name`` between two modules of
    the package."""
    modules = package_modules(root, package)
    found = []
    for name, path in modules.items():
        for base, names in imports_of(path, name, path.name == "__init__.py"):
            if base in modules and base != name:
                found.extend((name, base, n) for n in names
                             if n.startswith("_") and f"{base}.{n}" not in modules)
    return found


def test_no_module_imports_another_modules_private_names():
    assert private_imports(REPO, "gkl_kernels") == []


def test_one_distributed_helper():
    """``torch.distributed`` is imported by ``gkl_kernels/distributed.py`` alone."""
    users = []
    for name, path in package_modules(REPO, "gkl_kernels").items():
        for base, names in imports_of(path, name, path.name == "__init__.py"):
            if base == "torch.distributed" or base.startswith("torch.distributed.") or (
                    base == "torch" and "distributed" in names):
                users.append(name)
    assert users == ["gkl_kernels.distributed"]


def test_the_checks_can_fail(tmp_path):
    """A cycle, a kernel reaching the checks, a private import and a second distributed user
    are each found in a made-up package."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.a import f\n")
    (package / "validation.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import kernels\nfrom torch import distributed\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "kernels.py").write_text("from ..b import _helper\n")
    (package / "b.py").write_text("def g():\n    from pkg import validation, a\n")
    graph = import_graph(tmp_path, "pkg")
    assert cycles(graph) == [["pkg.a", "pkg.sub.kernels", "pkg.b", "pkg.a"]]
    assert cycles(unit_graph(graph, "pkg")) == [["pkg.a", "pkg.sub", "pkg.b", "pkg.a"]]
    assert "pkg.validation" in reachable(graph, "pkg.sub.kernels")
    assert private_imports(tmp_path, "pkg") == [("pkg.sub.kernels", "pkg.b", "_helper")]
