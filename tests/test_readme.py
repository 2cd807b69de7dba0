"""The README's commands as a new user runs them: from the repository root with the venv not activated. Every
command's program is there, takes the flags the README gives it and finds the files it names; the cheap ones run."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent  # the venv the tests run in: the README's .venv/bin


def readme_commands():
    """Every command line of the README's bash blocks, comments dropped, split at &&."""
    text, commands, inside = (ROOT / "README.md").read_text(), [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside and line.strip():
            words = shlex.split(line, comments=True)
            while "&&" in words:
                commands.append(words[:words.index("&&")])
                words = words[words.index("&&") + 1:]
            commands.append(words)
    return commands


def program(words):
    """-> (argv prefix that runs the program, its words after it) in this venv, or None for the system's python3."""
    if words[0] == "python3":
        return None
    assert words[0].startswith(".venv/bin/"), f"{shlex.join(words)}: run from the venv's bin, not as {words[0]}"
    exe = BIN / words[0].removeprefix(".venv/bin/")
    assert exe.exists(), f"{shlex.join(words)}: no {exe}"
    if exe.name.startswith("python"):
        if words[1] == "-m":
            return [str(exe), "-m", words[2]], words[3:]
        return [str(exe), str(ROOT / words[1])], words[2:]
    if exe.name == "imgcls-nnictl" or exe.name == "pip":
        return [str(exe), words[1]], words[2:]
    return [str(exe)], words[1:]


COMMANDS = readme_commands()


def test_the_readme_has_the_workflow_commands():
    tools = {Path(w[0]).name for w in COMMANDS}
    assert {"imgcls-nnictl", "imgcls-preflight", "imgcls-experiment", "imgcls-finalize", "imgcls-inference", "python"} <= tools


# Every program's --help, run in one process: for each, sys.argv as its own process has it, and its file run as
# __main__ (a console script's, train.py, or `-m`'s module) -> {key: [exit code, stdout, stderr]}. Run with -P: nothing
# on sys.path but the installed packages, as a console script has (a script dir's module that is not installed fails
# here, where `python train.py` would find it: a false failure, never a false pass).
HELP = r"""
import contextlib, io, json, runpy, sys, traceback
runs, written, results = json.loads(sys.argv[1]), sys.argv[2], {}
for key, (kind, target, argv) in runs:
    sys.argv, out, err = argv, io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(target, run_name="__main__", alter_sys=True) if kind == "module" else runpy.run_path(target, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            code = 1
            traceback.print_exc()
    results[key] = [code, out.getvalue(), err.getvalue()]
with open(written, "w") as f:
    json.dump(results, f)
"""


def help_run(prefix):
    """prefix (program()'s) -> (kind, target, sys.argv) of `prefix --help`."""
    if len(prefix) > 1 and prefix[1] == "-m":  # python -m module
        return "module", prefix[2], [prefix[2], *prefix[3:], "--help"]
    if Path(prefix[0]).name.startswith("python"):  # python script.py
        return "path", prefix[1], [prefix[1], *prefix[2:], "--help"]
    shebang = Path(prefix[0]).read_text().splitlines()[0].removeprefix("#!")  # a console script: runs with this venv
    assert Path(shebang).resolve() == Path(sys.executable).resolve(), f"{prefix[0]} runs {shebang}"
    return "path", prefix[0], [prefix[0], *prefix[1:], "--help"]


def needs_help(words):
    found = program(words)
    return found is not None and Path(found[0][0]).name != "pip"


@pytest.fixture(scope="module")
def usages(tmp_path_factory):
    """shlex.join(prefix) -> [exit code, stdout, stderr] of `prefix --help`, every program's in one process (console
    scripts first, so that each of them imports its own modules)."""
    prefixes = {shlex.join(p): p for p, _ in sorted((program(w) for w in COMMANDS if needs_help(w)),
                                                       key=lambda found: Path(found[0][0]).name.startswith("python"))}
    out = tmp_path_factory.mktemp("help") / "usages.json"
    proc = subprocess.run([sys.executable, "-P", "-c", HELP, json.dumps([(key, help_run(p)) for key, p in prefixes.items()]),
                           str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


FLAG = re.compile(r"--?[A-Za-z][\w-]*")


@pytest.mark.parametrize("words", [pytest.param(w, marks=[pytest.mark.slow] if needs_help(w) else []) for w in COMMANDS],
                         ids=[shlex.join(w)[:60] for w in COMMANDS])
def test_each_command_takes_its_flags_and_finds_its_files(words, request):
    found = program(words)
    if found is None:  # the machine's own python3 does one thing: make the venv every other command runs from
        assert words[:3] == ["python3", "-m", "venv"] and ".venv" in words[3:], f"{shlex.join(words)}: not the venv's python"
        return
    prefix, rest = found
    if Path(prefix[0]).name == "pip":
        assert (ROOT / rest[-1]).is_file()
        return
    code, usage, err = request.getfixturevalue("usages")[shlex.join(prefix)]
    assert code == 0, err
    for word in rest:
        if FLAG.fullmatch(word):
            assert word in usage, f"{shlex.join(words)}: {word} is not in its --help"
        elif word.endswith((".yml", ".txt")):
            assert (ROOT / word).is_file(), f"{shlex.join(words)}: no {word}"
    if prefix[-1] == "pytest":  # its -m names declared markers, and it is given the tests' dir
        declared = {line.split(":")[0].split("(")[0].strip() for line in request.config.getini("markers")}
        if "-m" in rest:
            named = set(rest[rest.index("-m") + 1].replace("(", " ").replace(")", " ").split()) - {"not", "and", "or"}
            assert named <= declared, f"{shlex.join(words)}: no marker {named - declared}"
        assert (ROOT / rest[-1]).is_dir(), f"{shlex.join(words)}: no {rest[-1]}"


@pytest.mark.slow
def test_preflight_of_config_local_passes_as_written():
    words = next(w for w in COMMANDS if Path(w[0]).name == "imgcls-preflight" and "config_local.yml" in w)
    proc = subprocess.run([str(BIN / "imgcls-preflight"), *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "preflight: this machine ready", proc.stdout + proc.stderr
