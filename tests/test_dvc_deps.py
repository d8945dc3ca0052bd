"""dvc.yaml lists each stage's own code in its deps: every module of the package that the stage's module imports,
directly or through others, is a dep, or lies under a folder that is. Imports inside functions count, except in the
methods' own files (a method's model and training load only when a stage calls it: the stages that do, train and
evaluate, list the whole methods/ folder) and in the package's lazy `__getattr__` (the Python API)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

SRC = ROOT / "src"
PACKAGE = "d2dprompt"


def module_file(name: str) -> Path | None:
    base = SRC / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _nodes(path: Path, methods_run: bool) -> list[ast.AST]:
    """The import statements that count: all of them, but in methods/ (unless the stage runs methods) and in
    __getattr__ those at module level only."""
    tree = ast.parse(path.read_text())
    if path.is_relative_to(SRC / PACKAGE / "methods") and not methods_run:
        return list(tree.body)
    skip = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__" for n in ast.walk(f)}
    return [n for n in ast.walk(tree) if id(n) not in skip]


def imported(path: Path, methods_run: bool = False) -> set[str]:
    """The package's modules `path` imports (a `from X import y` names X.y when that is a module, else X)."""
    names: set[str] = set()
    for node in _nodes(path, methods_run):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    return names


def closure(module: str, methods_run: bool = False) -> set[Path]:
    """Every file of the package a module needs to run: its imports, theirs, and each package's __init__.py; with
    `methods_run`, every method's code and what it imports too."""
    todo, files = [module], set()
    if methods_run:
        todo += [".".join(p.relative_to(SRC).with_suffix("").parts) for p in (SRC / PACKAGE / "methods").rglob("*.py")]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ first
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in files:
                files.add(path)
                todo += sorted(imported(path, methods_run))
    return files


def stages() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (the module its cmd runs, its deps)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = {}
    for name, stage in spec.items():
        body = stage.get("do", stage)
        words = body["cmd"].split()
        module = words[words.index("-m") + 1]
        found[name] = (module, [d for d in body["deps"] if d.startswith("src/")])
    return found


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_module_a_stage_imports_is_a_dep(name):
    module, deps = stages()[name]
    needed = {p.relative_to(ROOT).as_posix() for p in closure(module, "src/d2dprompt/methods" in deps)}
    missing = sorted(f for f in needed if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {name}: add to deps {missing}"
    stale = sorted(d for d in deps if not (ROOT / d).exists())
    assert not stale, f"dvc.yaml stage {name}: deps that are not there {stale}"


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_the_stages_that_run_methods_list_all_of_them(name):
    assert "src/d2dprompt/methods" in stages()[name][1]


def test_the_closure_follows_lazy_imports_outside_methods():
    files = {p.relative_to(SRC).as_posix() for p in closure("d2dprompt.pipeline.evaluate")}
    assert "d2dprompt/trained.py" in files  # imported inside evaluate's main only
    assert "d2dprompt/methods/draem/train.py" not in files  # DraemMethod.train's import: a method's own code
    assert "d2dprompt/serve/mlflow_detector.py" in files  # evaluate logs the detector it just gave thresholds (lazily)
    # d2dprompt.__getattr__ (the Python API) is no import: train reaches no serving code
    assert "d2dprompt/serve/detector.py" not in {p.relative_to(SRC).as_posix() for p in closure("d2dprompt.pipeline.train")}
