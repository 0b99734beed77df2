"""icecache/ is the engine and must stay usable without Ray."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "icecache"


def test_engine_never_imports_ray():
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("ray", "cluster", "deploy")]
    assert list(ROOT.rglob("*.py")) and not offenders


def test_cluster_never_imports_deploy():
    root = ROOT.parent / "cluster"
    offenders = [f"{path.name}: {node.module}" for path in root.rglob("*.py")
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "deploy"]
    assert list(root.rglob("*.py")) and not offenders
