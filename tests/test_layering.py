"""icecache/ is the engine and must stay usable without Ray; no module of ours reaches into
another's private names."""

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


def test_no_module_imports_or_reads_another_modules_private_names():
    """`from icecache.x import _name` and `x._name` on an imported module of ours are
    refused in the library and the benchmarks: what a tool needs is public API of the
    module that owns it."""
    ours = ("icecache", "cluster", "deploy", "benchmarks")
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    offenders, files = [], 0
    for package in ours:
        for path in (ROOT.parent / package).rglob("*.py"):
            files += 1
            tree = ast.parse(path.read_text())
            modules = set()  # names bound to a module or object imported from ours
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ours:
                    offenders += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                                  if private(a.name)]
                    modules |= {a.asname or a.name for a in node.names}
                elif isinstance(node, ast.Import):
                    modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in ours}
            offenders += [f"{path.name}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                          if isinstance(node, ast.Attribute) and private(node.attr)
                          and isinstance(node.value, ast.Name) and node.value.id in modules]
    assert files > 40 and not offenders, offenders


def test_benchmarks_use_only_the_public_api_and_the_tools_surface():
    """A benchmark imports the engine as a user does (`icecache`), or what is made for tools
    (`icecache.testing`, `icecache.internals`): never a module behind them."""
    allowed = {"icecache", "icecache.testing", "icecache.internals"}
    offenders, files = [], 0
    for path in (ROOT.parent / "benchmarks").rglob("*.py"):
        files += 1
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            offenders += [f"{path.name}: {m}" for m in modules if m.split(".")[0] == "icecache" and m not in allowed]
    assert files > 5 and not offenders, offenders
