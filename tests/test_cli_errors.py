"""Every command's bad input, as a user types it: a non-zero exit and one line on stderr naming the file or flag,
never a traceback (the README's promise; each tool's own tests check what the line says in detail)."""
import subprocess
import sys

import pytest

from conftest import ROOT, train_env
from sshd import free_port
from test_experiment import EXP, registered

TOOLS = {"train.py": "train.py",
         **{name: f"baseline/{name}" for name in ("inference.py", "export.py", "ensemble.py", "evaluation.py", "kfold.py")},
         **{name: f"search/{name}" for name in ("experiment.py", "finalize.py", "preflight.py")}}


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


@pytest.mark.slow
@pytest.mark.parametrize("tool, argv", [(tool, argv) for tool, cases in CASES.items() for argv in cases],
                         ids=[f"{tool} {' '.join(argv)}" for tool, cases in CASES.items() for argv in cases])
def test_bad_input_is_one_line_and_no_traceback(tool, argv, tmp_path, demo_dir):
    t = files(tmp_path)
    registered(tmp_path, ("trial1", "SUCCEEDED", tmp_path))  # a stopped search in nnictl's registry under HOME
    args = [a.format(t=t, port=free_port(), demo=demo_dir, exp=EXP) for a in argv]
    env = dict(train_env(), HOME=str(tmp_path))  # that registry: no experiment 'nosuch'
    proc = subprocess.run([sys.executable, str(ROOT / TOOLS[tool]), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if tool == "preflight.py" and not lines:  # preflight reports on stdout, a FAIL line per problem
        lines = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith((f"{tool}: error: ", f"{tool}: interrupted", "FAIL ")), lines[0]
