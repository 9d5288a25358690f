"""Each asset's `code_version`: a short hash of the code its value comes from, so the UI flags an asset stale
once that code changes.

The hash covers the named modules and every `phi2_assets.ml` module they import, directly or not, read as
syntax trees without docstrings: comments, formatting and docs leave a version as it is, any change to what the
code does changes it. Nothing is imported to compute it, and the same source gives the same version.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

ML_PACKAGE = "phi2_assets.ml"
PACKAGES_ROOT = Path(__file__).resolve().parent.parent
VERSION_LENGTH = 12
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def module_path(name: str, root: Path = PACKAGES_ROOT) -> Path | None:
    """The source file of module `name` under `root`, or None when `name` is not a module there."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(tree: ast.Module, package: str) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            names.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
    return names


def _starts_with_docstring(body: list[ast.stmt]) -> bool:
    first = body[0] if body else None
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def _tree(path: Path) -> ast.Module:
    tree = ast.parse(path.read_bytes())
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENTED) and _starts_with_docstring(node.body):
            node.body = node.body[1:] or [ast.Pass()]
    return tree


def source_closure(modules: Iterable[str], root: Path = PACKAGES_ROOT) -> dict[str, ast.Module]:
    """The syntax trees of `modules` and of every `phi2_assets.ml` module they import, by module name."""
    trees, pending = {}, list(modules)
    while pending:
        name = pending.pop()
        path = module_path(name, root)
        if name in trees or path is None:
            continue
        trees[name] = _tree(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        pending += [
            n for n in _imported_names(trees[name], package) if n == ML_PACKAGE or n.startswith(f"{ML_PACKAGE}.")
        ]
    return trees


def code_version(*modules: str, root: Path = PACKAGES_ROOT) -> str:
    """A short hash of what `modules` and the ML code they use do."""
    digest = hashlib.sha256()
    for name, tree in sorted(source_closure(modules, root).items()):
        digest.update(f"{name}\n{ast.dump(tree)}\n".encode())
    return digest.hexdigest()[:VERSION_LENGTH]
