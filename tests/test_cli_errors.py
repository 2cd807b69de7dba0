"""Every command's bad input, as a user types it: a non-zero exit and one line on stderr naming the file or flag,
never a traceback (the README's promise; each tool's own tests check what the line says in detail).
Every case runs in-process through the tool's cli(argv), as its console script calls it; one case per tool also
runs as the user's own process (`python tool.py ...`), so the imports, the exit code and stderr of a real process
are proven too, the __main__ block passing cli's code on included."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import train
from baseline import ensemble, evaluation, export, inference, kfold
from conftest import ROOT, run_cli, train_env
from search import experiment, finalize, preflight
from sshd import free_port
from test_experiment import EXP, registered

TOOLS = {"train.py": "train.py",
         **{name: f"baseline/{name}" for name in ("inference.py", "export.py", "ensemble.py", "evaluation.py", "kfold.py")},
         **{name: f"search/{name}" for name in ("experiment.py", "finalize.py", "preflight.py")}}
CLI = {"train.py": train.cli, "inference.py": inference.cli, "export.py": export.cli, "ensemble.py": ensemble.cli,
       "evaluation.py": evaluation.cli, "kfold.py": kfold.cli, "experiment.py": experiment.cli, "finalize.py": finalize.cli,
       "preflight.py": preflight.cli}
TYPOS = {"--modle", "--no_such_flag"}  # flags no tool has: argparse's error, exit code 2


def files(t):
    """Bad files of every kind a user hands over, written once per test."""
    made = {"empty.csv": "", "binary.csv": b"\x00\xff\x01\x02", "README.md": (ROOT / "README.md").read_text(),
            "text.pth": "not a checkpoint", "list.yml": "- a\n- b\n", "nocmd.yml": "trialConcurrency: 1\n"}
    for name, content in made.items():
        (t / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (t / "afile").write_text("x")  # a regular file where a directory is expected
    return t


CASES = {
    "train.py": [["--data_dir", "{t}/nowhere"], ["--lr", "-1"], ["--modle", "BaseModel"], ["--model", "nosuch"],
                 ["--weights", "{t}/text.pth", "--model", "resnet18"], ["--resume", "{t}/text.pth"],
                 ["--config", "{t}/README.md"], ["--data_dir", "{demo}/train", "--model_dir", "{t}/afile/runs"],
                 ["--data_dir", "{demo}/train", "--cache_dir", "{t}/afile/cache"]],
    "inference.py": [["--checkpoint", "{t}/nowhere.pth", "--eval_dir", "{t}"], ["--checkpoint", "{t}/text.pth", "--eval_dir", "{t}"],
                     ["--checkpoint", "{t}/text.pth", "--eval_dir", "{t}/nowhere"], ["--no_such_flag"]],
    "export.py": [["{t}/nowhere.pth"], ["{t}/text.pth"], ["{t}"], ["{t}/text.pth", "--out", "{t}/m.txt"], ["{t}/text.pth", "{t}/text.pth"],
                  ["{t}/text.pth", "--select", "soup"], ["--no_such_flag", "{t}/text.pth"]],
    "ensemble.py": [["{t}/nowhere.csv", "{t}/empty.csv"], ["{t}/empty.csv", "{t}/binary.csv"], ["{t}/binary.csv"],
                    ["--method", "median", "{t}/empty.csv"]],
    "evaluation.py": [["{t}/empty.csv", "--truth", "{t}/nowhere.csv"], ["{t}/binary.csv", "--truth", "{t}/empty.csv"], ["{t}/empty.csv"]],
    "kfold.py": [["--k", "1"], ["--reuse", "{t}/nowhere"], ["--eval_dir", "{t}/nowhere"], ["--no_such_flag"],
                 ["--k", "2", "--", "--fold", "1"]],
    "experiment.py": [["--id", "nosuch"], ["--port", "{port}"], [], ["--id", "nosuch", "--fetch"]],
    "finalize.py": [["--id", "{exp}", "--config", "{t}/README.md"], ["--id", "{exp}", "--config", "{t}/list.yml"],
                    ["--id", "x", "--config", "{t}/README.md"], ["--id", "x", "--config", "{t}/nowhere.yml"],
                    ["--id", "x", "--config", "{t}/list.yml"], ["--id", "x", "--config", "{t}/nocmd.yml"],
                    ["--id", "nosuch", "--config", str(ROOT / "config_local.yml")], ["--id", "x", "--config", "c", "--k", "1"],
                    ["--port", "{port}", "--config", str(ROOT / "config_local.yml")], ["--config", "c.yml"]],
    "preflight.py": [["{t}/nowhere.yml"], ["{t}/README.md"], ["{t}/list.yml"], ["--no_such_flag", "x.yml"]],
}
ALL = [(tool, argv) for tool, cases in CASES.items() for argv in cases]
# In a real process: each tool's first case, a user error through run_main (exit code 1, returned by cli() and
# passed on by the script's __main__ block), and train.py's flag typo (argparse's exit code 2 out of a process).
IN_A_PROCESS = [(tool, cases[0]) for tool, cases in CASES.items()] + [("train.py", ["--modle", "BaseModel"])]


def case_id(case):
    tool, argv = case
    return f"{tool} {' '.join(argv)}"


@pytest.fixture
def user_args(tmp_path, demo_dir):
    """-> argv template -> the args as the user types them, in a tmp dir holding the bad files and a stopped search
    in nnictl's registry under HOME (no experiment 'nosuch')."""
    t = files(tmp_path)
    registered(tmp_path, ("trial1", "SUCCEEDED", tmp_path))
    return lambda argv: [a.format(t=t, port=free_port(), demo=demo_dir, exp=EXP) for a in argv]


def check(tool, argv, code, out, err):
    """A non-zero exit (2: argparse's, for a flag no tool has) and one line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    if tool == "preflight.py" and not lines:  # preflight reports on stdout, a FAIL line per problem
        lines = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert code and "Traceback" not in err + out, err[-2000:]
    assert code == 2 or not TYPOS & set(argv), (code, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith((f"{tool}: error: ", f"{tool}: interrupted", "FAIL ")), lines[0]


@pytest.mark.parametrize("tool, argv", ALL, ids=map(case_id, ALL))
def test_bad_input_is_one_line_and_no_traceback(tool, argv, user_args, tmp_path, monkeypatch, capsys):
    """In-process, as the process would run it: cwd and HOME the tmp dir, no NNI_ variables; the signal handlers
    (train.py, export.py, finalize.py install them) and torch's thread count (inference.py, kfold.py set it) put back."""
    monkeypatch.chdir(tmp_path)
    # preflight(out=sys.stdout) binds the stdout of its import: hand it this test's captured one
    monkeypatch.setattr(preflight.preflight, "__defaults__", (*preflight.preflight.__defaults__[:-1], sys.stdout))
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in [k for k in os.environ if k.startswith("NNI_")]:
        monkeypatch.delenv(name)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    try:
        code, out, err = run_cli(CLI[tool], capsys, *user_args(argv))  # an exception out of it: a traceback, the test fails
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)
    check(tool, argv, code, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("tool, argv", IN_A_PROCESS, ids=map(case_id, IN_A_PROCESS))
def test_bad_input_in_a_real_process_is_one_line_and_no_traceback(tool, argv, user_args, tmp_path):
    env = dict(train_env(), HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / TOOLS[tool]), *user_args(argv)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    check(tool, argv, proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == (2 if TYPOS & set(argv) else 1), proc.stderr[-2000:]
