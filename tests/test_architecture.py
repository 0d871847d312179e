"""The package's shape, checked from its source with ``ast`` (nothing is imported or run).

The rules (docs/architecture.md says why):

* no import circle between modules (function-level imports count: they are circles too, only later);
* no import that runs back up a layer: capture never imports dataset, deploy, cli, a workflow (draw,
  stats, generation) or the package root; storage never imports dataset, cli or a workflow; dataset
  never imports cli or a workflow; a workflow never imports cli, another workflow or the package
  root, and draw and generation never import dataset;
* no module imports an underscore module of another subpackage (each subpackage's public surface is
  its ``__init__`` and its plainly named modules);
* no ``x._private`` read (nor ``getattr(x, "_private")``) on an object other than ``self`` / ``cls``;
* no module over 400 lines;
* no branch on a format's name (``"npy"``, ``"safetensors"`` in a comparison) outside ``dataset/formats/``.

Violations that live in ``fxstore/capture/`` and ``fxstore/storage/`` (being changed elsewhere), and
the imports of capture internals that ``capture/__init__`` does not export yet, are listed below, each
exactly, so the lists can only shrink: an entry that no longer occurs fails the test too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fxstore"
LIMIT = 400
FORMAT_NAMES = {"npy", "safetensors"}
WORKFLOWS = ("draw", "stats", "generation")  # workflows on the extractor, each its own room
LAYERS_BELOW = {  # subpackage: the subpackages (and root modules) it must never import
    "capture": {"dataset", "deploy", "cli", *WORKFLOWS, ""},
    "storage": {"dataset", "cli", *WORKFLOWS, ""},
    "dataset": {"cli", *WORKFLOWS, ""},
    "draw": {"dataset", "cli", "stats", "generation", ""},
    "stats": {"cli", "draw", "generation", ""},
    "generation": {"dataset", "cli", "draw", "stats", ""},
}
SHARED = {"fxstore.errors", "fxstore._version", "fxstore._workflows"}  # the root's modules every layer may use

# -- the allow-lists ------------------------------------------------------------------------------------
# Each entry is exact, and a test fails when an entry no longer occurs: the lists can only shrink.
ALLOWED_UPWARD: set[tuple[str, str]] = set()
ALLOWED_PRIVATE_IMPORTS: set[tuple[str, str]] = set()
ALLOWED_PRIVATE_READS = {  # (module, attribute)
    # capture/ and storage/: torch.fx / nn.Module internals (torch's attributes, not fxstore's)
    ("fxstore.capture._alias", "_schema"),
    ("fxstore.capture._export", "_codegen"),
    ("fxstore.capture._export", "_guards_fn"),
    ("fxstore.capture._export", "_in_spec"),
    ("fxstore.capture._export", "_opname"),
    ("fxstore.capture._export", "_out_spec"),
    ("fxstore.capture._frontends", "_codegen"),
    ("fxstore.capture._frontends", "_tracer_cls"),
    ("fxstore.capture._partial", "_modules"),
    ("fxstore.capture._registry", "_forward_hooks"),  # other libraries' hooks make a module a leaf
    ("fxstore.capture._registry", "_forward_pre_hooks"),
    ("fxstore.capture._rewrite", "_opname"),
    ("fxstore.capture.extractor", "_buffers"),
    ("fxstore.capture.extractor", "_modules"),
    ("fxstore.capture.extractor", "_non_persistent_buffers_set"),
    ("fxstore.capture.extractor", "_parameters"),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _imports(name: str, path: Path) -> list[str]:
    """Every fxstore module ``name`` imports (at any level), resolved to module names."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "fxstore"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fxstore":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found += subs
            if len(subs) < len(node.names):
                found.append(target)
    return [m for m in found if m in MODULES]


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and MODULES[".".join(parts[:2])].name == "__init__.py" else ""


def _private_part(module: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in module.split(".")[1:])


def test_the_walk_sees_the_package():
    assert {"fxstore", "fxstore.errors", "fxstore.dataset", "fxstore.dataset.formats", "fxstore.cli"} <= set(MODULES)
    assert "fxstore.dataset.formats.npy" in GRAPH["fxstore.dataset.formats"]


def test_no_import_circles():
    graph = {m: [t for t in targets if (m, t) not in ALLOWED_UPWARD] for m, targets in GRAPH.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_no_import_runs_back_up_a_layer():
    found = set()
    for module, targets in GRAPH.items():
        below = LAYERS_BELOW.get(_subpackage(module), set())
        for target in targets:
            if target not in SHARED and _subpackage(target) in below:
                found.add((module, target))
    assert found - ALLOWED_UPWARD == set()
    assert ALLOWED_UPWARD - found == set(), "allow-listed imports that are gone: remove them"


def test_no_module_imports_another_subpackages_underscore_module():
    found = set()
    for module, targets in GRAPH.items():
        for target in targets:
            if target not in SHARED and _subpackage(target) != _subpackage(module) and _private_part(target):
                found.add((module, target))
    assert found - ALLOWED_PRIVATE_IMPORTS == set()
    assert ALLOWED_PRIVATE_IMPORTS - found == set(), "allow-listed imports that are gone: remove them"


def _private_reads(path: Path) -> set[str]:
    external = set()  # names bound to modules of other packages (torch._dynamo is torch's business)
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            external |= {(a.asname or a.name).split(".")[0] for a in node.names if not a.name.startswith("fxstore")}
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("fxstore"):
            external |= {a.asname or a.name for a in node.names}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) and not (
                    isinstance(root, ast.Name) and root.id in external):
                found.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and node.args[1].value.startswith("_") and not node.args[1].value.startswith("__")
              and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))):
            found.add(node.args[1].value)
    return found


def test_nothing_reads_another_objects_private_attribute():
    found = {(module, attr) for module, path in MODULES.items() for attr in _private_reads(path)}
    assert found - ALLOWED_PRIVATE_READS == set()
    assert ALLOWED_PRIVATE_READS - found == set(), "allow-listed reads that are gone: remove them"


ALLOWED_LONG: set[str] = set()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_400_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= LIMIT or module in ALLOWED_LONG, f"{module} has {lines} lines"


def test_the_long_allow_list_only_names_long_modules():
    assert all(len(MODULES[m].read_text().splitlines()) > LIMIT for m in ALLOWED_LONG)


def _format_branches(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(v, ast.Constant) and v.value in FORMAT_NAMES for v in values):
                    lines.append(node.lineno)
        elif isinstance(node, ast.MatchValue) and isinstance(node.value, ast.Constant) \
                and node.value.value in FORMAT_NAMES:
            lines.append(node.lineno)
    return lines


def test_no_branch_on_a_format_name_outside_the_formats():
    formats = PACKAGE / "dataset" / "formats"
    found = {f"{m}:{line}" for m, p in MODULES.items() if formats not in p.parents for line in _format_branches(p.read_text())}
    assert found == set()


def test_the_format_check_sees_a_branch():
    sample = 'def f(m):\n    return 1 if m["format"] == "npy" else 2\n\n\nok = m in ("safetensors", "x")\n'
    assert sorted(_format_branches(sample)) == [2, 5]
