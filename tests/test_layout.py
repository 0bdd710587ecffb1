"""The training loop knows no method: train.py, step.py and main.py name no
method, read no method-specific property, and call only the Method hooks."""

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
