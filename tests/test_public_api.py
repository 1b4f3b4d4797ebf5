"""solo_d2 extends detectron2 and fvcore through their public API only.

The private names of the installed detectron2 and fvcore (``_``-prefixed, not dunder: module-level
functions, classes and assignments, methods, ``self._x`` attributes) are collected from their
sources; the project's code (``solo_d2/**/*.py``, ``train_net.py``, ``tools/*.py``,
``demo/*.py``) may not

* import one (``from detectron2.x import _y``),
* access one as an attribute (``obj._y``, ``self._y``),
* define a method of that name in a class derived from a detectron2 / fvcore class (it would
  replace, or later collide with, upstream's),

except in ``solo_d2/compat.py``, the one module allowed to rely on them (checked by
``tests/test_compat.py``).
"""

import ast
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

import detectron2
import fvcore
from conftest import REPO

UPSTREAM_PACKAGES = ("detectron2", "fvcore")
EXEMPT = {"solo_d2/compat.py"}

# (class, method): upstream methods documented as meant to be overridden by subclasses
OVERRIDABLE = {
    # fvcore.common.checkpoint.Checkpointer._load_file: "Load a checkpoint file. Can be
    # overwritten by subclasses to support different formats."
    ("SafeCheckpointer", "_load_file"),
}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _python_files(root: Path) -> Iterable[Path]:
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                yield Path(folder) / name


def private_names_of(tree: ast.Module) -> Set[str]:
    """Private module-level names, method names and ``self._x`` attributes defined in ``tree``."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            names.update(
                item.name
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            )
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            names.add(node.attr)
    return {n for n in names if is_private(n)}


@lru_cache(maxsize=None)
def upstream_private_names() -> frozenset:
    names = set()
    for package in (detectron2, fvcore):
        for path in _python_files(Path(package.__file__).parent):
            names |= private_names_of(ast.parse(path.read_text(encoding="utf-8")))
    return frozenset(names)


def _root_name(node: ast.expr) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def upstream_imports(tree: ast.Module) -> Set[str]:
    """The local names bound to detectron2 / fvcore modules or objects in ``tree``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in UPSTREAM_PACKAGES:
                names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UPSTREAM_PACKAGES:
                    names.add(alias.asname or alias.name.split(".")[0])
    return names


def derived_classes(trees: Dict[str, ast.Module]) -> Set[str]:
    """Names of the project's classes derived (directly or through project classes) from a
    detectron2 / fvcore class."""
    bases: Dict[str, List[Tuple[str, bool]]] = {}
    for tree in trees.values():
        imported = upstream_imports(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, []).extend(
                    (_base_name(b), _root_name(b) in imported) for b in node.bases
                )
    derived = {name for name, bs in bases.items() if any(upstream for _, upstream in bs)}
    while True:
        more = {
            n for n, bs in bases.items() if n not in derived and any(b in derived for b, _ in bs)
        }
        if not more:
            return derived
        derived |= more


def violations(trees: Dict[str, ast.Module], private: Iterable[str]) -> List[str]:
    """``file:line: name`` of each use of an upstream private name in ``trees``."""
    private = set(private)
    derived = derived_classes(trees)
    found = []
    for filename, tree in sorted(trees.items()):
        in_file = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] in UPSTREAM_PACKAGES:
                    in_file.extend((node.lineno, a.name) for a in node.names if is_private(a.name))
            elif isinstance(node, ast.Attribute) and node.attr in private:
                in_file.append((node.lineno, node.attr))
            elif isinstance(node, ast.ClassDef) and node.name in derived:
                for item in node.body:
                    if (
                        isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and item.name in private
                        and (node.name, item.name) not in OVERRIDABLE
                    ):
                        in_file.append((item.lineno, f"{node.name}.{item.name}"))
        found.extend(f"{filename}:{line}: {name}" for line, name in sorted(in_file))
    return found


def project_trees() -> Dict[str, ast.Module]:
    paths = list(_python_files(REPO / "solo_d2")) + list(_python_files(REPO / "dev"))
    paths += [REPO / "train_net.py"]
    paths += sorted((REPO / "tools").glob("*.py")) + sorted((REPO / "demo").glob("*.py"))
    trees = {}
    for path in paths:
        name = path.relative_to(REPO).as_posix()
        if name not in EXEMPT:
            trees[name] = ast.parse(path.read_text(encoding="utf-8"), filename=name)
    return trees


def test_the_project_uses_no_private_detectron2_or_fvcore_name():
    private = upstream_private_names()
    # the collection works: names solo_d2 used to rely on are in it
    assert {"_distributed_worker", "_find_free_port", "_output_dir", "_load_file"} <= private
    trees = project_trees()
    assert "solo_d2/engine/trainer.py" in trees and "train_net.py" in trees
    found = violations(trees, private)
    assert not found, "private detectron2 / fvcore names used:\n" + "\n".join(found)


def test_the_check_finds_each_kind_of_use():
    source = """
from detectron2.engine.launch import _find_free_port, launch
from detectron2.evaluation import COCOEvaluator
import fvcore.common.checkpoint as ckpt

class Mine(COCOEvaluator):
    def _eval_predictions(self, predictions):
        return self._results

class Deeper(Mine):
    def _tasks_from_predictions(self, predictions):
        return ckpt.Checkpointer._load_file

class Unrelated:
    def _eval_predictions(self):
        return self.__class__, self._mine
"""
    trees = {"x.py": ast.parse(source)}
    found = violations(trees, upstream_private_names())
    assert found == [
        "x.py:2: _find_free_port",
        "x.py:7: Mine._eval_predictions",
        "x.py:8: _results",
        "x.py:11: Deeper._tasks_from_predictions",
        "x.py:12: _load_file",
    ]
