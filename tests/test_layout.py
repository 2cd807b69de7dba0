"""The project's structure: imports that run one way between the layers, one home per concern, tools
that never import train.py, no import cycles, short functions, and CSV-only tools that start without torch."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

FOLDERS = ("", "core", "imagedata", "training", "search", "baseline", "bench")
MODULES = {p: p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
           for folder in FOLDERS for p in sorted((ROOT / folder).glob("*.py"))}
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

# The layers, bottom first (README, Layout). A module may import its own layer and those below, never above.
LAYERS = [
    ("bottom: pure helpers", lambda m: m.split(".")[0] == "core"),
    ("middle: data, model, loss, optim", lambda m: m in ("dataset", "model", "weights", "loss", "optim") or m.split(".")[0] == "imagedata"),
    ("training: flags, engine, checkpoint format, prediction, averaging, export", lambda m: m.split(".")[0] == "training"),
    ("top: train.py and the tools", lambda m: m == "train" or m.split(".")[0] in ("search", "baseline", "bench")),
]


def layer_of(module):
    found = [i for i, (_, member) in enumerate(LAYERS) if member(module)]
    assert len(found) == 1, f"{module} is in {len(found)} layers: give it exactly one in LAYERS"
    return found[0]


def upward_imports(graph):
    """'a -> b' for every import from a module into a layer above its own."""
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
                  for a, imported in graph.items() for b in imported if layer_of(b) > layer_of(a))


def test_every_module_has_one_layer():
    for module in GRAPH:
        layer_of(module)


def test_imports_run_one_way_down_the_layers():
    assert upward_imports(GRAPH) == []


def test_the_layer_check_finds_an_import_running_up():
    # what the direction check would say if dataset.py imported the training loop, or core the model
    graph = dict(GRAPH, dataset=GRAPH["dataset"] | {"training.engine"}, **{"core.labels": {"model"}})
    assert upward_imports(graph) == [
        "core.labels (bottom: pure helpers) -> model (middle: data, model, loss, optim)",
        "dataset (middle: data, model, loss, optim) -> training.engine (training: flags, engine, checkpoint format, prediction, "
        "averaging, export)"]


def test_one_torch_load_in_the_project():
    """Every checkpoint and weights file goes through core.files.load_untrusted (weights_only=True)."""
    calls = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in MODULES for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "load"
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"]
    assert calls == ["core/files.py:" + str(next(n.lineno for n in ast.walk(ast.parse((ROOT / "core/files.py").read_text()))
                                                 if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "load"))]


def matched_strings(tree):
    """String constants a file looks for in text: startswith/endswith/re.* patterns and `"..." in text`."""
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and getattr(n.func, "attr", "") in ("startswith", "endswith", "search", "match", "fullmatch",
                                                                         "findall", "compile", "sub"):
            found += [a.value for a in n.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        elif isinstance(n, ast.Compare) and isinstance(n.left, ast.Constant) and isinstance(n.left.value, str) \
                and any(isinstance(op, (ast.In, ast.NotIn)) for op in n.ops):
            found.append(n.left.value)
    return found


def is_tool(path):
    """A command a user runs (python path/to/tool.py): the modules a tool may import are libraries, never tools."""
    return 'if __name__ == "__main__":' in path.read_text()


TOOLS = {MODULES[p] for p in MODULES if is_tool(p) and layer_of(MODULES[p]) == len(LAYERS) - 1}


def test_no_tool_imports_another_tool():
    """Tools share the library below them; one tool importing another is a sideways lean that hides a missing library."""
    edges = sorted(f"{a} -> {b}" for a in TOOLS for b in GRAPH[a] if b in TOOLS)
    assert edges == []


CODE = [p for p in sorted(ROOT.glob("**/*.py")) if not {".venv", "tests"} & set(p.relative_to(ROOT).parts)]


def test_no_code_file_over_400_lines():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in CODE if (n := len(p.read_text().splitlines())) > 400]
    assert long == []


def test_nothing_edits_sys_path():
    """The project installs (pip install -e .): an import finds its module without a path edit."""
    words = ("sys.path" + ".insert", "noqa" + ": E402")  # spelt apart so that this file does not list itself
    edits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted(ROOT.glob("**/*.py")) if ".venv" not in p.parts
             for i, line in enumerate(p.read_text().splitlines(), 1) if any(w in line for w in words)]
    assert edits == []


PRINTED = ("run dir", "first step", "still rising", "best val", "training ", "resuming ", "wrote ", "epoch ")


def test_no_tool_parses_what_train_py_prints():
    """Tools read a run's files (summary.json, history.csv), never train.py's printed lines."""
    offenders = [f"{p.relative_to(ROOT)}: {text!r}" for p in MODULES if p.parts[-2] in ("search", "baseline", "bench")
                 for text in matched_strings(ast.parse(p.read_text())) if text.lstrip("^").startswith(PRINTED)]
    assert offenders == []


def test_the_print_check_finds_a_parser():
    tree = ast.parse('run = next(l for l in out.splitlines() if l.startswith("run dir "))\n'
                     'x = re.search(r"first step ([0-9.]+)s", log)\nw = "still rising" in err')
    assert sorted(matched_strings(tree)) == ["first step ([0-9.]+)s", "run dir ", "still rising"]
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


def console_scripts():
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_tool_is_a_console_script():
    """pyproject.toml names a console script for each tool a user runs (bench's studies are for developers, and
    search/probe.py runs on the servers, sent by preflight)."""
    targets = {target.split(":")[0] for target in console_scripts().values()}
    users = {t for t in TOOLS if not t.startswith("bench.") and t != "search.probe"}
    assert users - targets == set()


def test_bench_is_run_from_the_checkout_not_installed():
    """bench/ measures the project for its developers: `python -m bench.X` from the checkout, nothing of it in
    site-packages or on a user's PATH."""
    import tomllib
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "bench" not in setuptools["packages"] and not any(t.startswith("bench.") for t in console_scripts().values())
    code = "import importlib.util; print(importlib.util.find_spec('bench'))"
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None", out


@pytest.mark.parametrize("script", ["imgcls-evaluation", "imgcls-finalize"])
def test_a_console_script_runs_from_the_venv(script, tmp_path):
    """The project installs (requirements.txt's -e .): the entry point runs from the venv's bin, from any folder."""
    path = Path(sys.executable).parent / script
    assert path.is_file(), f"{path}: not installed (pip install -r requirements.txt installs the project)"
    proc = subprocess.run([str(path), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: "), proc.stderr


def test_one_prediction_loop_in_training_predict():
    """engine.predict and the ImageDataset + DataLoader pair behind it are called from training/predict.py only
    (dataset.py builds the training loaders)."""
    found = []
    for path, module in MODULES.items():
        tree = ast.parse(path.read_text())
        imports_predict = any(isinstance(n, ast.ImportFrom) and n.module == "training.engine" and any(a.name == "predict" for a in n.names)
                              for n in ast.walk(tree))
        builds = any(isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "ImageDataset" for n in ast.walk(tree))
        if (imports_predict or builds) and module not in ("training.predict", "dataset"):
            found.append(module)
    assert found == []


def run_file_names():
    """core/runs.py's names of a run's files and folders: its module-level constants in capitals whose value is a file
    name (BEST = "best.pth", EPOCHS = "epochs", ...), so a name added there is checked with no edit here."""
    from core import runs
    return {value for name, value in vars(runs).items()
            if name.isupper() and isinstance(value, str) and re.fullmatch(r"\.?[\w-]+(\.\w+)?", value)}


def docstrings(tree):
    return {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def spelled_names(tree, names):
    """(line, name) where code spells one of names: a path join (x / "name", Path("name"), open("name"), f"{x}/name",
    "name/..."), and a name with a dot (best.pth: not a word) as any string. A folder's name (epochs) is a word as
    well (a flag, a column): spelled only in a path. Docstrings may name the files."""
    found, skip = [], docstrings(tree)
    for n in ast.walk(tree):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
            found += [(o.lineno, o.value) for o in (n.left, n.right) if isinstance(o, ast.Constant) and o.value in names]
        elif isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) in ("Path", "open", "joinpath", "join"):
            found += [(o.lineno, o.value) for o in n.args if isinstance(o, ast.Constant) and o.value in names]
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip:
            found += [(n.lineno, x) for x in sorted(names) if "." in x and n.value == x
                      or n.value.endswith(f"/{x}") or n.value.startswith(f"{x}/") or f"/{x}/" in n.value]
    return sorted(set(found))


def test_run_file_names_are_spelled_in_core_runs_only():
    """core/runs.py is the one place a run's file names are spelled: every other module takes its constants."""
    names = run_file_names()
    assert {"best.pth", "epochs", "report.md", "kfold.json", "oof_soft.csv", "tensorboard"} <= names
    spelled = [f"{path.relative_to(ROOT)}:{line} {name}" for path, module in MODULES.items() if module != "core.runs"
               for line, name in spelled_names(ast.parse(path.read_text()), names)]
    for path in MODULES:  # the names in code that a string holds, such as python -c's
        spelled += [f"{path.relative_to(ROOT)}: {n}" for n in names for q in "'\"" if f"/ {q}{n}{q}" in path.read_text()]
    assert spelled == []


def test_the_run_file_check_finds_a_spelling():
    tree = ast.parse('"""Writes best.pth/last.pth."""\nx = run / "epochs" / "epoch1.pth"\nm = row["epochs"]\n'
                     'open("history.csv")\nf"{run}/config.json"\nname = "summary.json"\nf"{run / \'soup.pth\'}"')
    assert spelled_names(tree, {"best.pth", "epochs", "history.csv", "config.json", "summary.json", "soup.pth", "last.pth"}) == [
        (2, "epochs"), (4, "history.csv"), (5, "config.json"), (6, "summary.json"), (7, "soup.pth")]


def test_package_docstrings_say_one_line_and_leave_the_map_to_design_md():
    for init in sorted(ROOT.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "\n" not in doc.strip() and "docs/design.md" in doc, f"{init.relative_to(ROOT)}: {doc!r}"


def module_map(text):
    """A design.md's module map (its first code block: layer, path, what it does) -> (the paths its entries name, in the
    path column, and every .py path it mentions anywhere)."""
    block = re.search(r"^```\n(.*?)^```", text, re.S | re.M).group(1)
    firsts = [(m.start(1), m.group(1)) for line in block.splitlines() if (m := re.match(r"(?:top|training|middle|bottom)?\s+(\S+)", line))]
    column = min(start for start, _ in firsts)
    return [token for start, token in firsts if start == column], re.findall(r"(?<![\w/.-])((?:\w+/)*\w+\.py)\b", block)


def map_errors(text, modules):
    """What a module map gets wrong about modules (paths from the root): the ones it leaves out (a package is named by
    its folder), the ones it names twice, and the paths it names that are not there."""
    entries, mentioned = module_map(text)
    named = {m.removesuffix("__init__.py") for m in modules}
    return ([f"not in the map: {m}" for m in sorted(named - set(entries))]
            + [f"named twice: {e}" for e in sorted({e for e in entries if entries.count(e) > 1})]
            + [f"not there: {e}" for e in sorted(set(entries) | set(mentioned)) if not (ROOT / e).exists()])


def test_design_md_maps_every_module_and_nothing_else():
    """docs/design.md's module map names every module of the project (each package by its folder), once, and no path
    that is not there."""
    assert map_errors((ROOT / "docs" / "design.md").read_text(), [p.relative_to(ROOT).as_posix() for p in MODULES]) == []


def test_the_map_check_finds_a_gap_and_a_stale_path():
    text = ("```\ntop        train.py         flags, fit, and set by search/gone.py\n"
            "           search/          the search phase\n"
            "                            (search/finalize.py, in a description: no entry)\n"
            "bottom     core/gone.sh     removed\n"
            "           core/runs.py     the run files\n           core/runs.py     again\n```\n")
    assert map_errors(text, ["train.py", "search/__init__.py", "search/finalize.py", "core/__init__.py", "core/runs.py"]) == [
        "not in the map: core/", "not in the map: search/finalize.py", "named twice: core/runs.py",
        "not there: core/gone.sh", "not there: search/gone.py"]


def test_readme_is_at_most_150_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
