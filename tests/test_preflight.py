"""baseline/preflight.py against a real OpenSSH server on 127.0.0.1 (tests/sshd.py)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from baseline.preflight import flag_value, gpu_problem, interpreter_of
from conftest import ROOT
from sshd import free_port, keygen, start_sshd


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data" / "train"
    d.mkdir(parents=True)
    (d / "train.csv").write_text("id,gender,race,age,path\n")
    return d


def write_config(tmp_path, sshd, data_dir, *, interpreter=sys.executable, **machine):
    entry = {"host": sshd.host, "port": sshd.port, "user": sshd.user, "sshKeyFile": str(sshd.key_file),
             "pythonPath": str(Path(sys.executable).parent)}
    entry.update(machine)
    config = {
        "searchSpaceFile": "search_space.json",
        "trialCommand": f"{interpreter} train.py --data_dir {data_dir} --epochs 2",
        "trialCodeDirectory": ".",
        "trialConcurrency": 1,
        "nniManagerIp": "127.0.0.1",
        "tuner": {"name": "TPE", "classArgs": {"optimize_mode": "maximize"}},
        "trainingService": {"platform": "remote", "machineList": [entry]},
    }
    path = tmp_path / "config_remote.yml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def preflight(config_path, port=None):
    port = port or free_port()
    proc = subprocess.run([sys.executable, str(ROOT / "baseline" / "preflight.py"), str(config_path), "--port", str(port),
                           "--timeout", "5"], capture_output=True, text=True, timeout=300)
    return proc


def test_all_checks_pass_against_loopback_sshd(tmp_path, sshd, data_dir):
    path, _ = write_config(tmp_path, sshd, data_dir)
    port = free_port()
    proc = preflight(path, port)
    assert proc.returncode == 0, proc.stdout + proc.stderr + sshd.log()
    line = proc.stdout.splitlines()[0]
    assert line.startswith(f"OK   {sshd.user}@127.0.0.1:{sshd.port} ")
    for part in ("ssh ok", f"python {sys.executable}", "nni 3.0", "torch ", "trial same env", "gpu ",
                 f"data {data_dir}", f"callback 127.0.0.1:{port}"):
        assert part in line, line
    assert "all 1 machine(s) ready" in proc.stdout


def test_wrong_ssh_port_fails_on_ssh(tmp_path, sshd, data_dir):
    path, _ = write_config(tmp_path, sshd, data_dir, port=free_port())
    proc = preflight(path)
    assert proc.returncode == 1
    line = proc.stdout.splitlines()[0]
    assert line.startswith(f"FAIL {sshd.user}@127.0.0.1:") and " ssh: login failed" in line
    assert "Connection refused" in line


def test_wrong_key_fails_on_ssh(tmp_path, sshd, data_dir):
    other = keygen(tmp_path / "not_authorized")
    path, _ = write_config(tmp_path, sshd, data_dir, sshKeyFile=str(other))
    proc = preflight(path)
    assert proc.returncode == 1
    line = proc.stdout.splitlines()[0]
    assert line.startswith(f"FAIL {sshd.user}@127.0.0.1:{sshd.port} ssh: login failed")
    assert "Permission denied" in line


def test_missing_key_file_and_missing_data_dir(tmp_path, sshd, data_dir):
    path, _ = write_config(tmp_path, sshd, data_dir, sshKeyFile=str(tmp_path / "nope"))
    proc = preflight(path)
    assert proc.returncode == 1 and "ssh: sshKeyFile" in proc.stdout and "not found" in proc.stdout

    path, _ = write_config(tmp_path, sshd, tmp_path / "no" / "such" / "dir")
    proc = preflight(path)
    assert proc.returncode == 1
    line = proc.stdout.splitlines()[0]
    assert line.startswith("FAIL ") and "data: --data_dir" in line and "not a directory" in line
    assert "ssh:" not in line and "callback:" not in line  # only the failing check is named


def test_trial_interpreter_of_another_env_fails(tmp_path, sshd, data_dir):
    # The venv's base interpreter is another environment than pythonPath (the venv):
    # the same situation as a ~/.bashrc that puts pyenv/conda shims before pythonPath.
    base = os.path.realpath(sys.executable)
    if os.path.realpath(sys.prefix) == os.path.realpath(sys.base_prefix):
        pytest.skip("tests do not run in a virtual environment")
    path, _ = write_config(tmp_path, sshd, data_dir, interpreter=base)
    proc = preflight(path)
    assert proc.returncode == 1
    assert "trial: trialCommand's" in proc.stdout and "not the pythonPath env" in proc.stdout


def test_gpu_request_on_cpu_host_fails(tmp_path, sshd, data_dir):
    path, config = write_config(tmp_path, sshd, data_dir)
    config["trialGpuNumber"] = 1
    path.write_text(yaml.safe_dump(config))
    proc = preflight(path)
    assert proc.returncode == 1 and "gpu: trialGpuNumber 1 but no GPU found" in proc.stdout


def test_config_problems(tmp_path, sshd, data_dir):
    path, config = write_config(tmp_path, sshd, data_dir)
    del config["nniManagerIp"]
    path.write_text(yaml.safe_dump(config))
    proc = preflight(path)
    assert proc.returncode == 1 and "FAIL config: nniManagerIp is not set" in proc.stdout

    path, _ = write_config(tmp_path, sshd, data_dir)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        proc = preflight(path, busy.getsockname()[1])
    assert proc.returncode == 1 and "FAIL config callback: port" in proc.stdout and "already in use" in proc.stdout


def test_gpu_rules_of_nni_3_0():
    assert gpu_problem(1, 1, 1) and "maxTrialNumberPerGpu: 2" in gpu_problem(1, 1, 1)
    assert gpu_problem(1, 1, 2) is None          # 0.5 GPU per trial: schedules
    assert gpu_problem(2, 1, 1) is None
    assert gpu_problem(2, 2, 1) is not None      # all GPUs of the host: never
    assert gpu_problem(1, None) is None and gpu_problem(0, None) is None
    assert gpu_problem(4, 1, 1, [7]) is not None  # gpuIndices outside the host


def test_command_parsing():
    cmd = "OMP_NUM_THREADS=1 python3 train.py --data_dir '/data/my set/train' --epochs=3"
    assert flag_value(cmd, "--data_dir") == "/data/my set/train"
    assert flag_value(cmd, "--epochs") == "3"
    assert flag_value(cmd, "--port") is None
    assert interpreter_of(cmd) == "python3"
    assert interpreter_of("/opt/venv/bin/python train.py") == "/opt/venv/bin/python"
    assert interpreter_of("bash run.sh") is None
