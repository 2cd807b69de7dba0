"""nnictl, with time for its manager to start: `imgcls-nnictl create --config config_local.yml`.

NNI 3.0's `nnictl create` (and resume, view) starts its manager (a node process) and asks it for
check-status three times, a second apart; then it kills it and fails with "Create experiment failed:
... /api/v1/nni/check-status ... Connection refused". On a busy machine node can take longer than
that (CI met it). This is nnictl itself with that wait made START_WAIT_S seconds, cut short when the
manager has exited. Two more differences: a busy port is one line before anything starts (stock nnictl
prints a traceback), and this interpreter's bin dir goes first on PATH, so that local trials' `python3` is the
one that has torch, as `.venv/bin/imgcls-nnictl` runs without the venv activated. The rest is stock; the
search tools start experiments through it.
"""
import os
import sys
import time
from pathlib import Path

from nni.experiment import launcher

from search.nni_io import port_problem

START_WAIT_S = 60


def wait_for_manager(port, url_prefix=None, proc=None, wait_s=START_WAIT_S):
    """Return once the manager on `port` answers check-status; after wait_s seconds, or once `proc` (the
    manager) has exited, raise the error stock nnictl raises."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            launcher.rest.get(port, "/check-status", url_prefix)
            return
        except Exception:   # as stock nnictl's own check: refused, timed out, not ready (5xx)
            time.sleep(0.2)
    launcher.rest.get(port, "/check-status", url_prefix)


def patch_launcher(wait_s=START_WAIT_S):
    """Make nni.experiment.launcher wait for the manager it started with wait_for_manager, and refuse a busy port
    in one line."""
    started = []
    stock_start = launcher._start_rest_server

    def start(*args, **kwargs):
        started.append(stock_start(*args, **kwargs))
        return started[-1]

    def check(port, retry=3, url_prefix=None):
        wait_for_manager(port, url_prefix, started[-1] if started else None, wait_s)

    def ensure_port_idle(port, message=None):  # stock raises RuntimeError: a traceback
        problem = port_problem(port, f" ({message})" if message else "")
        if problem:
            raise SystemExit(f"imgcls-nnictl: error: {problem}")

    launcher._start_rest_server, launcher._check_rest_server, launcher._ensure_port_idle = start, check, ensure_port_idle


def cli(argv=None):
    # not resolved: a venv's bin/python is a link out of it, and its own dir is what puts the venv first
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    patch_launcher()
    from nni.tools.nnictl.nnictl import parse_args
    sys.argv = ["nnictl", *(sys.argv[1:] if argv is None else argv)]
    sys.exit(parse_args())


if __name__ == "__main__":
    cli()
