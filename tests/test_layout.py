"""The project's structure: one home per concern, tools that never import train.py, no import cycles,
short functions, and CSV-only tools that start without torch."""
import ast
import subprocess
import sys

import pytest

from conftest import ROOT

MODULES = {p: p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
           for folder in ("", "core", "baseline", "bench") for p in sorted((ROOT / folder).glob("*.py"))}
NAMES = set(MODULES.values())


def imports_of(path):
    """Project modules a file imports, at any depth (lazy imports in functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found & NAMES


GRAPH = {MODULES[p]: imports_of(p) - {MODULES[p]} for p in MODULES}


@pytest.mark.parametrize("module", sorted(n for n in NAMES if n != "train"))
def test_nothing_imports_train(module):
    assert "train" not in GRAPH[module]


def test_import_graph_has_no_cycle():
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(node):] + [node])}")
        if node in done:
            return
        path.append(node)
        for other in sorted(GRAPH[node]):
            visit(other)
        path.pop()
        done.add(node)

    for node in sorted(GRAPH):
        visit(node)


def test_no_function_longer_than_60_lines():
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in sorted(ROOT.glob("**/*.py")) if ".venv" not in p.parts
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long


@pytest.mark.parametrize("tool", ["ensemble", "evaluation"])
def test_csv_tools_start_without_torch(tool):
    code = (f"import runpy, sys; sys.argv = ['{tool}.py', '--help']\n"
            f"try: runpy.run_path({str(ROOT / 'baseline' / f'{tool}.py')!r}, run_name='__main__')\n"
            f"except SystemExit: pass\n"
            f"print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage:" in out and out.strip().endswith("NO TORCH")
