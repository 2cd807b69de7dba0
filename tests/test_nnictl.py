"""search/nnictl.py: nnictl with time for its manager to start, against a real HTTP server that comes up late."""
import contextlib
import http.server
import json
import subprocess
import sys
import threading
import time

import pytest
import requests
from nni.experiment import launcher

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
