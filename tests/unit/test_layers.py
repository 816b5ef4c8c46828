"""Imports flow one way: `cluster -> deployments -> indexing -> training` between packages, and inside training/
`metrics <- data <- models <- request <- fit <- evaluation`; serving never imports the evaluation stack, and the
request-time cores import no Ray. Unit tests mirror the package layout."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"training": 0, "indexing": 1, "deployments": 2, "cluster": 3}
TRAINING = {"training": 0, "metrics": 0, "data": 1, "models": 2, "request": 3, "fit": 4, "evaluation": 5}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import a module runs, at any depth; `if TYPE_CHECKING:` blocks are left out."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.lineno, child.module))
                found.extend((child.lineno, f"{child.module}.{a.name}") for a in child.names)
            visit(child)

    source = path.read_text()
    try:
        tree = ast.parse(source, filename=str(path))
    except SystemError:  # CPython 3.11's "AST constructor recursion depth mismatch" when another thread of the
        tree = ast.parse(source, filename=str(path))  # session (Ray, Serve in local mode) was in the parser
    visit(tree)
    return found


def module_files(root: Path, package: str) -> list[Path]:
    return sorted(p for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts)


def layer(module: str) -> tuple[int, int] | None:
    """(package rank, training subpackage rank) of a project module, None for a third-party one."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    sub = TRAINING.get(parts[1], None) if parts[0] == "training" and len(parts) > 1 else 0
    return PACKAGES[parts[0]], 0 if sub is None else sub


def name_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for package in PACKAGES:
        for path in module_files(root, package):
            me = layer(name_of(path, root))
            for line, imported in imports_of(path):
                other = layer(imported)
                where = f"{path.relative_to(root)}:{line} imports {imported}"
                if other is not None and (other[0] > me[0] or (me[0] == other[0] == 0 and other[1] > me[1])):
                    out.append(f"{where}: against the layer order")
                if package in ("indexing", "deployments") and imported.startswith("training.evaluation"):
                    out.append(f"{where}: serving never imports the evaluation stack")
                if package == "training" and imported.startswith("ray.serve"):
                    out.append(f"{where}: training/ imports no Ray Serve")
                if name_of(path, root).startswith("training.request") and imported.split(".")[0] == "ray":
                    out.append(f"{where}: the request-time cores import no Ray")
    return out


def test_imports_follow_the_layers():
    assert violations() == []


def test_the_checker_reports_each_kind_of_crossing_and_skips_type_only_imports(tmp_path):
    files = {"training/models/bad.py": "def f():\n    from training.evaluation.harness import run_eval\n",
             "training/data/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cluster.cli\n",
             "training/request/core.py": "import ray\n",
             "indexing/embed.py": "import deployments.app\n",
             "deployments/app.py": "from training.evaluation import report\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = violations(tmp_path)
    assert any(v.startswith("training/models/bad.py:2 imports training.evaluation.harness") for v in found)
    assert not any("typed.py" in v for v in found)
    assert any("request/core.py:1" in v and "no Ray" in v for v in found)
    assert any(v.startswith("indexing/embed.py:1 imports deployments.app") for v in found)
    assert any(v.startswith("deployments/app.py:1") and "evaluation stack" in v for v in found)


@pytest.mark.parametrize("folder", sorted(p for p in (ROOT / "tests" / "unit").rglob("*")
                                          if p.is_dir() and p.name != "__pycache__"), ids=str)
def test_unit_test_folders_mirror_the_packages(folder):
    assert (ROOT / folder.relative_to(ROOT / "tests" / "unit")).is_dir(), f"{folder}: no such package folder"
