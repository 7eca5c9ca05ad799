"""Code-shape rules the project holds itself to (README, "How sdrt is built")."""

from __future__ import annotations

import ast
from pathlib import Path

import sdrt

MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_60_lines():
    root = Path(sdrt.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
