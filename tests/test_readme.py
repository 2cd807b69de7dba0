"""The README's commands as a new user runs them: from the repository root with the venv not activated. Every
command's program is there, takes the flags the README gives it and finds the files it names; the cheap ones run."""
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


@pytest.mark.slow
@pytest.mark.parametrize("words", COMMANDS, ids=[shlex.join(w)[:60] for w in COMMANDS])
def test_each_command_takes_its_flags_and_finds_its_files(words):
    found = program(words)
    if found is None:  # python3 -m venv .venv: the machine's own
        return
    prefix, rest = found
    if prefix[-1] == "pytest":
        return
    if Path(prefix[0]).name == "pip":
        assert (ROOT / rest[-1]).is_file()
        return
    usage = subprocess.run([*prefix, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0, usage.stderr
    for word in rest:
        if word.startswith("--"):
            assert word in usage.stdout, f"{shlex.join(words)}: {word} is not in its --help"
        elif word.endswith((".yml", ".txt")):
            assert (ROOT / word).is_file(), f"{shlex.join(words)}: no {word}"


@pytest.mark.slow
def test_preflight_of_config_local_passes_as_written():
    words = next(w for w in COMMANDS if Path(w[0]).name == "imgcls-preflight" and "config_local.yml" in w)
    proc = subprocess.run([str(BIN / "imgcls-preflight"), *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "preflight: this machine ready", proc.stdout + proc.stderr
