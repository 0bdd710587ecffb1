"""The training loop knows no method: train.py, step.py and main.py name no
method, read no method-specific property, and call only the Method hooks. And
no two jaxreid modules import each other, directly or through others."""

from __future__ import annotations

import ast
import dataclasses
import os

import pytest

from jaxreid.methods import Method, method_names

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxreid")
WORDS = ("scl", "cluster", "supervised", "warmup", "pseudo", "bank")


def _code_names(path: str) -> tuple[set[str], set[str], set[str]]:
    """(identifiers and attributes, string constants that are not docstrings,
    attributes read from a variable named `method`)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    names, strings, hooks = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
            if isinstance(node.value, ast.Name) and node.value.id == "method":
                hooks.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                strings.add(node.value)
    return names, strings, hooks


@pytest.mark.parametrize("module", ["train.py", "step.py", "main.py"])
def test_loop_names_no_method(module):
    names, strings, hooks = _code_names(os.path.join(PACKAGE, module))
    for text in names | strings:
        assert text not in method_names(), (module, text)
        # "cluster" is allowed in main.py's flag help ("cluster environment").
        lowered = text.lower()
        bad = [w for w in WORDS if w in lowered and not (module == "main.py" and w == "cluster")]
        assert not bad, (module, text)
    assert hooks <= {f.name for f in dataclasses.fields(Method)}, (module, hooks)


# ---------------------------------------------------------------- import cycles


def _runs_at_import(body: list[ast.stmt]):
    """The statements of a module body that run when it is imported: the top
    level and the blocks of top-level if / try / with statements (not function
    or class bodies, nor `if TYPE_CHECKING:` blocks)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            test = node.test
            name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", "")
            if name != "TYPE_CHECKING":
                yield from _runs_at_import(node.body)
            yield from _runs_at_import(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse):
                yield from _runs_at_import(block)
            yield from _runs_at_import(node.finalbody)
        elif isinstance(node, ast.With):
            yield from _runs_at_import(node.body)


def _import_graph(package_dir: str) -> dict[str, set[str]]:
    """module -> the modules of the package it imports at import time.
    `from a.b import c` imports a.b.c when that is a module of the package, else a.b."""
    root = os.path.dirname(package_dir)
    paths = {}
    for folder, _, files in os.walk(package_dir):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                name = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
                paths[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in paths.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        imported = set()
        for node in _runs_at_import(tree.body):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    imported.add(submodule if submodule in paths else base)
        graph[name] = imported & paths.keys()
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a] of the graph, or None."""
    done, path = set(), []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(module)
        return None

    return next(filter(None, map(visit, sorted(graph))), None)


def test_no_import_cycle_among_jaxreid_modules():
    graph = _import_graph(PACKAGE)
    assert "jaxreid.models.cpu_kernels" in graph["jaxreid.models.winograd"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_import_cycle_check_finds_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
    (package / "a.py").write_text("def f():\n    from pkg import b\n")  # not at import time
    (package / "sub" / "b.py").write_text(
        "try:\n    from .. import a\nexcept ImportError:\n    a = 0\n"
    )
    graph = _import_graph(str(package))
    assert graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.a"] == set()
    assert _find_cycle(graph) is None
    (package / "a.py").write_text("from pkg.sub import b\n")
    assert _find_cycle(_import_graph(str(package))) == ["pkg.a", "pkg.sub.b", "pkg.a"]
