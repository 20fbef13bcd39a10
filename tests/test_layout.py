"""The package's house rules, checked on the source: short functions, imports that only point
down the pipeline, no private names reached across modules, and an import that stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prunejax"

# The pipeline, low to high (docs/ARCHITECTURE.md): a module imports only from its left.
ORDER = (
    "_util",
    "_version",
    "selection",
    "masks",
    "distributions",
    "criteria",
    "schedules",
    "transforms",
    "lottery",
    "quantize",
    "compact",
    "graph",
    "models",
    "sparse",
    "fileformat",
    "sharded",
    "report",
    "keras",
    "apps",
)
MAX_FUNCTION_LINES = 80


def _modules() -> list[tuple[str, Path, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path, ast.parse(path.read_text(), filename=str(path))))
    return out


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "prunejax" or len(parts) < 2 or parts[1] not in ORDER:
        return None
    return ORDER.index(parts[1])


def _imported(node: ast.AST) -> list[tuple[str, str | None]]:
    """``(module, name)`` pairs a node imports from prunejax (``name`` None for ``import m``)."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prunejax"):
        return [(node.module, a.name) for a in node.names]
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name.startswith("prunejax")]
    return []


def test_every_module_is_in_the_dependency_order():
    unknown = {
        name.split(".")[1]
        for name, _, _ in _modules()
        if name.count(".") >= 1 and _stage(name) is None and name.split(".")[1] != "__main__"
    }
    assert not unknown, f"add {sorted(unknown)} to ORDER here and to docs/ARCHITECTURE.md"


def test_no_function_is_longer_than_the_limit():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for _, path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions over 80 lines (docstring included):\n" + "\n".join(long)


def test_imports_only_point_down_the_pipeline():
    upward = []
    for name, path, tree in _modules():
        me = _stage(name)
        if me is None:  # the package root and __main__ may import anything
            continue
        for node in ast.walk(tree):
            for module, member in _imported(node):
                targets = [module] + ([f"{module}.{member}"] if member else [])
                if any((_stage(t) or 0) > me for t in targets):
                    upward.append(f"{path.relative_to(ROOT)}:{node.lineno} {name} -> {module}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_private_name_is_imported_across_modules():
    private = [
        f"{path.relative_to(ROOT)}:{node.lineno} {module}.{member}"
        for _, path, tree in _modules()
        for node in ast.walk(tree)
        for module, member in _imported(node)
        if member and member.startswith("_") and not member.startswith("__")
    ]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_import_prunejax_loads_neither_the_app_nor_its_dependencies():
    code = (
        "import sys, prunejax; "
        "print(sorted(m for m in ('prunejax.apps', 'tensorflow_datasets', 'matplotlib', 'tqdm') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_app_names_resolve_lazily_from_the_flat_namespace():
    code = "import prunejax as pj; f = pj.fit; import sys; print('prunejax.apps' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
