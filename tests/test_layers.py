"""The package's import structure: no import cycles, and the light layers stay light.

Imports are read from the source (``ast``), function-level imports included: an import moved into
a function to dodge a cycle is still a dependency, and is still reported here.
"""

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import solo_d2

PACKAGE_DIR = Path(solo_d2.__file__).resolve().parent


def _module_names() -> Dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    names = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package's modules it imports (anywhere in its source)."""
    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                for alias in node.names:  # "from . import x" may name a submodule
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> str:
    """The first-level part of the package a module belongs to ("config", "data", ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_relative_and_function_level_imports():
    graph = import_graph()
    assert "solo_d2.config.defaults" in graph["solo_d2.config.loading"]
    assert "solo_d2.modeling" in graph["solo_d2"]  # imported inside add_solo_config


def test_no_module_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles between modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_cycle_between_layers():
    """config, data, modeling, ... depend on each other in one direction only. The package's
    ``__init__`` (the facade that re-exports from the layers) is left out."""
    layers: Dict[str, Set[str]] = {}
    for module, targets in import_graph().items():
        if module == "solo_d2":
            continue
        layer = _layer(module)
        layers.setdefault(layer, set()).update(
            _layer(t) for t in targets if t != "solo_d2" and _layer(t) != layer
        )
    found = cycles(layers)
    assert not found, "import cycles between layers:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_config_layer_depends_on_detectron2_only():
    """``solo_d2.config`` imports nothing of the package outside itself, and at run time nothing
    that ``detectron2.config`` does not import already (detectron2's own package ``__init__``
    imports cv2, so cv2 is loaded by any detectron2 import; pycocotools is not)."""
    graph = import_graph()
    outside = {
        (m, t)
        for m, targets in graph.items()
        if m.startswith("solo_d2.config")
        for t in targets
        if not t.startswith("solo_d2.config")
    }
    assert not outside, f"solo_d2.config imports other parts of the package: {sorted(outside)}"
    probe = (
        "import sys\n"
        "import detectron2.config\n"
        "before = set(sys.modules)\n"
        "import solo_d2.config\n"
        "added = sorted({m.split('.')[0] for m in set(sys.modules) - before})\n"
        "print(','.join(added))\n"
        "print('pycocotools' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["solo_d2", "False"], out
