"""Layering: every module imports on its own, first, in a fresh interpreter (no import cycle kept
alive by deferred imports), and the config module is a leaf that imports nothing of flowmaps."""

import ast
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import flowmaps

MODULES = sorted(m.name for m in pkgutil.walk_packages(flowmaps.__path__, prefix="flowmaps.") if m.name != "flowmaps.__main__")


@pytest.mark.slow
def test_every_module_imports_alone_first():
    def imports(name: str) -> tuple[str, int, str]:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        return name, done.returncode, done.stderr[-400:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [r for r in pool.map(imports, ["flowmaps", *MODULES]) if r[1] != 0]
    assert not failed, failed


def test_the_config_module_is_a_leaf():
    tree = ast.parse(Path(flowmaps.__file__).with_name("train").joinpath("config.py").read_text())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + \
            [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n and n.startswith("flowmaps")], names


def test_no_module_imports_inside_functions_to_break_a_cycle():
    """Function-level imports of flowmaps modules exist only in the CLI (which defers heavy imports for a
    fast start), never in the library."""
    root = Path(flowmaps.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("flowmaps"):
                        offenders.append(f"{path.relative_to(root)}:{inner.lineno}")
    assert not offenders, offenders
