"""The package's layout: no import cycle, no private name used across modules.

Read from the source (the AST of every module under ``pali_kit/``), not by
importing it, so every import counts: at module level, inside functions and
under ``TYPE_CHECKING``. A module's edge goes to what it names
(``from ..data import Batcher`` -> ``pali_kit.data``, ``from .. import decode``
-> ``pali_kit.decode``); the implicit import of a parent package is not an
edge (every submodule has one).

A private name is one with a single leading underscore. ``from .x import _y``
and ``x._y`` (``x`` an imported kit module) across modules are reported;
a name shared by two modules is public and documented, or lives where it is used.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pali_kit"

# Left to the modules' owners; remove an entry once it is gone (the tests warn then).
KNOWN_CYCLES: set[frozenset[str]] = set()
KNOWN_PRIVATE: set[tuple[str, str]] = set()
# subpackages whose modules import the kit relatively (``from ..x import y``)
RELATIVE_ONLY = ("pali_kit.data", "pali_kit.train")


@dataclasses.dataclass(frozen=True)
class Use:
    """Module ``importer`` (line ``line``) imports ``target``; ``private``: a ``_name`` of it."""

    importer: str
    target: str
    line: int
    private: str | None = None
    absolute: bool = False


def modules(root: Path, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``), for every .py under root/package."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _source_of(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def uses(root: Path, package: str = PACKAGE) -> list[Use]:
    """Every use of one kit module by another: imports, and ``alias._private`` attributes."""
    found = modules(root, package)
    out = []
    for module, (path, is_package) in found.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        aliases = {}  # local name -> kit module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _source_of(node, module, is_package)
                if source is None or source.split(".")[0] != package:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    target = sub if sub in found else source
                    if sub in found:
                        aliases[alias.asname or alias.name] = sub
                    private = sub if _is_private(alias.name) and sub not in found else None
                    out.append(Use(module, target, node.lineno, private, node.level == 0))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        out.append(Use(module, alias.name, node.lineno, None, True))
                        aliases[alias.asname or alias.name.split(".")[0]] = (
                            alias.name if alias.asname else package
                        )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _is_private(node.attr)
            ):
                target = aliases[node.value.id]
                out.append(Use(module, target, node.lineno, f"{target}.{node.attr}"))
    return [u for u in out if u.target != u.importer]


def cycles(edges: list[Use], names) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {n: set() for n in names}
    for use in edges:
        if use.target in graph:
            graph[use.importer].add(use.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _where(edges: list[Use], cycle: frozenset[str]) -> str:
    inside = [u for u in edges if u.importer in cycle and u.target in cycle]
    return "; ".join(f"{u.importer}:{u.line} -> {u.target}" for u in inside)


def _warn_stale(name: str, stale) -> None:
    # a warning, not a failure: a branch that removes a leftover merges without touching this file
    if stale:
        listed = sorted(sorted(x) if isinstance(x, frozenset) else x for x in stale)
        warnings.warn(f"gone from the code, remove from {name}: {listed}", stacklevel=2)


# ============================================================================ the kit


def test_no_import_cycle_between_the_kits_modules():
    edges = uses(ROOT)
    found = cycles(edges, modules(ROOT))
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(_where(edges, c) for c in new)
    _warn_stale("KNOWN_CYCLES", KNOWN_CYCLES - set(found))


def test_no_private_name_is_used_across_modules():
    crossing = {(u.importer, u.private): u for u in uses(ROOT) if u.private}
    new = [u for key, u in sorted(crossing.items()) if key not in KNOWN_PRIVATE]
    assert not new, "private names used by another module (make them public, or move them):\n" + (
        "\n".join(f"  {u.importer}:{u.line} uses {u.private}" for u in new)
    )
    _warn_stale("KNOWN_PRIVATE", KNOWN_PRIVATE - set(crossing))


@pytest.mark.parametrize("subpackage", RELATIVE_ONLY)
def test_subpackages_import_the_kit_relatively(subpackage):
    absolute = [
        f"{u.importer}:{u.line} imports {u.target}"
        for u in uses(ROOT)
        if u.absolute and (u.importer == subpackage or u.importer.startswith(subpackage + "."))
    ]
    assert not absolute, "use relative imports (from ..x import y):\n" + "\n".join(absolute)


def test_data_imports_without_jax_and_still_offers_the_grading_names():
    # the data package reads files and draws scenes: numpy only. score_shapes and
    # grade_answer live in train.evaluation; pali_kit.data hands them out on first use.
    code = (
        "import sys, pali_kit.data as d; assert 'jax' not in sys.modules, 'jax imported'; "
        "from pali_kit.data import grade_answer; import pali_kit.train.evaluation as e; "
        "assert d.score_shapes is e.score_shapes and grade_answer is e.grade_answer; "
        "assert {'score_shapes', 'grade_answer'} <= set(dir(d))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]


# ============================================================================ the checks can fail


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), "utf-8")


def test_the_checks_find_a_cycle_and_private_names_in_a_small_package(tmp_path):
    _write(
        tmp_path,
        {
            "pali_kit/__init__.py": "",
            "pali_kit/a.py": "from .sub import b\n",
            "pali_kit/sub/__init__.py": "",
            "pali_kit/sub/b.py": "def f():\n    from ..c import _hidden\n",
            "pali_kit/c.py": (
                "import pali_kit.a as a_mod\nfrom pali_kit import d\n"
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n"
                "_hidden = d._inner + d.__name__\n"
            ),
            "pali_kit/d.py": "_inner = 1\n",
        },
    )
    edges = uses(tmp_path)
    names = modules(tmp_path)
    assert set(names) == {"pali_kit", "pali_kit.a", "pali_kit.sub", "pali_kit.sub.b",
                          "pali_kit.c", "pali_kit.d"}  # fmt: skip
    # a -> sub.b -> c (inside a function) -> a (under TYPE_CHECKING, and `import ... as`)
    assert cycles(edges, names) == [frozenset({"pali_kit.a", "pali_kit.sub.b", "pali_kit.c"})]
    private = {(u.importer, u.private) for u in edges if u.private}
    assert private == {
        ("pali_kit.sub.b", "pali_kit.c._hidden"),
        ("pali_kit.c", "pali_kit.d._inner"),
    }
    assert {u.importer for u in edges if u.absolute} == {"pali_kit.c"}
    # without the function-level import there is no cycle
    _write(tmp_path, {"pali_kit/sub/b.py": "X = 1\n"})
    assert cycles(uses(tmp_path), names) == []
