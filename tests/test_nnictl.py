"""search/nnictl.py: nnictl with time for its manager to start, against a real HTTP server that comes up late."""
import contextlib
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import yaml
from nni.experiment import launcher

from conftest import ROOT
from search import nnictl
from sshd import free_port

LATE_S = 5   # later than stock nnictl's three tries a second apart


class CheckStatus(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "RUNNING"}).encode()
        self.send_response(200 if self.path == "/api/v1/nni/check-status" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def manager_up_after(seconds):
    """A port on which a check-status server starts listening `seconds` from now."""
    port, servers = free_port(), []

    def serve():
        servers.append(http.server.HTTPServer(("127.0.0.1", port), CheckStatus))
        servers[0].serve_forever(poll_interval=0.05)

    timer = threading.Timer(seconds, serve)
    timer.start()
    try:
        yield port
    finally:
        timer.cancel()
        if servers:
            servers[0].shutdown()
            servers[0].server_close()
        timer.join()


def test_stock_nnictl_gives_up_on_a_manager_that_starts_late_and_ours_waits():
    with manager_up_after(LATE_S) as port:
        start = time.monotonic()
        with pytest.raises(requests.ConnectionError):
            launcher._check_rest_server(port)   # what `nnictl create` does after starting its manager
        assert time.monotonic() - start < LATE_S
        nnictl.wait_for_manager(port)
        assert time.monotonic() - start >= LATE_S


def test_wait_gives_up_at_once_when_the_manager_has_exited():
    port, dead = free_port(), subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    start = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        nnictl.wait_for_manager(port, proc=dead)
    assert time.monotonic() - start < 5


def test_wait_gives_up_after_its_time():
    start = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        nnictl.wait_for_manager(free_port(), wait_s=1)
    assert 1 <= time.monotonic() - start < 5


def test_it_is_nnictl():
    out = subprocess.run([sys.executable, "-m", "search.nnictl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr


def nnictl_run(module, *args, home, timeout=120):
    """nnictl (stock: nni.tools.nnictl.nnictl, or ours: search.nnictl) as a user without the venv on PATH runs it."""
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "MPLCONFIGDIR": str(home / "mpl")}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def tiny_config(tmp_path, command):
    config = {"searchSpace": {"x": {"_type": "choice", "_value": [1]}}, "trialCommand": command, "trialCodeDirectory": str(tmp_path),
              "trialConcurrency": 1, "maxTrialNumber": 1, "tuner": {"name": "TPE", "classArgs": {"optimize_mode": "maximize"}},
              "trainingService": {"platform": "local"}}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    return tmp_path / "c.yml"


@pytest.mark.slow
def test_a_busy_port_is_a_traceback_from_stock_nnictl_and_one_line_from_ours(tmp_path, nni_home):
    config = tiny_config(tmp_path, "python3 -c pass")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stock = nnictl_run("nni.tools.nnictl.nnictl", "create", "--config", config, "--port", port, home=nni_home)
        assert stock.returncode == 1 and "Traceback (most recent call last)" in stock.stderr
        assert f"RuntimeError: Port {port} is not idle" in stock.stderr
        ours = nnictl_run("search.nnictl", "create", "--config", config, "--port", port, home=nni_home)
    assert ours.returncode == 1 and "Traceback" not in ours.stderr
    assert ours.stderr.strip().splitlines()[-1] == (f"imgcls-nnictl: error: port {port} is in use here (an experiment on it? "
                                                    f"`imgcls-nnictl stop --port {port}`; else pick another port)")


@pytest.mark.slow
def test_local_trials_take_python3_from_the_interpreter_that_runs_it(tmp_path, nni_home):
    """`python3` on a PATH without the venv is the machine's, without torch: every trial failed with
    "No module named 'torch'" unless the user put the venv first on PATH."""
    assert shutil.which("python3", path="/usr/bin:/bin") != sys.executable
    config = tiny_config(tmp_path, f"python3 -c \"import sys, torch; open('{tmp_path / 'which'}', 'w').write(sys.prefix)\"")
    port = free_port()
    created = nnictl_run("search.nnictl", "create", "--config", config, "--port", port, home=nni_home)
    assert created.returncode == 0, created.stdout + created.stderr
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "which").is_file() and time.monotonic() < deadline:
            time.sleep(1)
        assert (tmp_path / "which").read_text() == sys.prefix
    finally:
        nnictl_run("search.nnictl", "stop", "--port", port, home=nni_home)
