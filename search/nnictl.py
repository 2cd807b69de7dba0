"""nnictl, with time for its manager to start: `imgcls-nnictl create --config config_local.yml`.

NNI 3.0's `nnictl create` (and resume, view) starts its manager (a node process) and asks it for
check-status three times, a second apart; then it kills it and fails with "Create experiment failed:
... /api/v1/nni/check-status ... Connection refused". On a busy machine node can take longer than
that (CI met it). This is nnictl itself with that wait made START_WAIT_S seconds, cut short when the
manager has exited. Four more differences: a busy port is one line before anything starts (stock nnictl
prints a traceback); this interpreter's bin dir goes first on PATH, so that local trials' `python3` is the
one that has torch, as `.venv/bin/imgcls-nnictl` runs without the venv activated; the manager loads
search/nni_manager_fixes.js, so that a remote server lost mid-search fails its trials instead of keeping them RUNNING
for good (that file says how); and `resume ID` first stops what a crashed manager of ID left running, on each server
and on this machine (search/leftovers.py). Stock resume refuses an experiment whose manager was killed ("Only
stopped experiments can be resumed", and a traceback: nnictl's registry still says RUNNING); past that (`nnictl
experiment list` updates it), when the manager alone died (a crash, the OOM killer), its tuner, its trials and a
remote server's trial keeper live on: resumed on the same port, the old tuner and the new one take turns on the manager's
channel ("Channel __default__ reconnecting"; it ended in ERROR in issue 47's runs), and the old trial trains on
beside its rerun, in the same directory. Stopped first (SIGTERM: a trial saves its epoch and ends), the resumed
manager reruns each trial that was RUNNING under its own id and directory, where train.py continues its last.pth.
The rest is stock; the search tools start experiments through it.
"""
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from nni.experiment import launcher

from search import leftovers, nni_io
from search.nni_io import port_problem
from search.trials import from_id

START_WAIT_S = 60
MANAGER_FIXES = Path(__file__).with_name("nni_manager_fixes.js")  # a lost server's trials FAILED, not RUNNING for good
LEFTOVERS = Path(leftovers.__file__)


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
        before = os.environ.get("NODE_OPTIONS")
        os.environ["NODE_OPTIONS"] = f'{before or ""} --require "{MANAGER_FIXES}"'.strip()  # the file takes it out again
        try:
            started.append(stock_start(*args, **kwargs))
        finally:
            os.environ.pop("NODE_OPTIONS") if before is None else os.environ.update(NODE_OPTIONS=before)
        return started[-1]

    def check(port, retry=3, url_prefix=None):
        wait_for_manager(port, url_prefix, started[-1] if started else None, wait_s)

    def ensure_port_idle(port, message=None):  # stock raises RuntimeError: a traceback
        problem = port_problem(port, f" ({message})" if message else "")
        if problem:
            raise SystemExit(f"imgcls-nnictl: error: {problem}")

    launcher._start_rest_server, launcher._check_rest_server, launcher._ensure_port_idle = start, check, ensure_port_idle


def stop_left_on_servers(exp_id):
    """leftovers.py on each server of experiment exp_id, over SSH with its pythonPath's interpreter: the trial keepers
    and trials its dead manager left there (they would train beside the trials NNI reruns, and the keepers reconnect to
    the resumed manager). A server that cannot be reached is one line; resume goes on."""
    try:
        config = from_id(exp_id).params
    except LookupError:
        return
    for m in nni_io.machines_of(config):
        script = f"{LEFTOVERS.read_text()}\nstop({exp_id!r}, {' on ' + m.name!r}, tuner=False)  # no tuner runs there\n"
        try:
            r = subprocess.run([*nni_io.ssh_base(m, 10), nni_io.python_on(m, "-")], input=script, capture_output=True, text=True,
                               timeout=120)
        except subprocess.TimeoutExpired:
            r = subprocess.CompletedProcess([], 255, "", "no answer in 120 s")
        print(r.stdout, end="", flush=True)
        if r.returncode:
            reason = next(iter(r.stderr.strip().splitlines()[-1:]), f"exit {r.returncode}")
            print(f"imgcls-nnictl: could not stop what the crashed manager of {exp_id} left on {m.name}: {reason}", flush=True)


def mark_stopped(exp_id):
    """nnictl's registry still says RUNNING for an experiment whose manager was killed (a clean stop alone updates it),
    and stock resume refuses that with a traceback ("Only stopped experiments can be resumed or viewed!")."""
    from nni.tools.nnictl.config_utils import Experiments
    experiments = Experiments()
    info = experiments.get_all_experiments().get(exp_id)
    if isinstance(info, dict) and info.get("status") != "STOPPED" and not leftovers.alive(info.get("pid")):
        experiments.update_experiment(exp_id, "status", "STOPPED")


def known(exp_id):
    """Stock resume answers an id it does not know with an ERROR line, then an AttributeError's traceback."""
    registry = nni_io.registry()
    if exp_id not in registry:
        raise SystemExit(f"imgcls-nnictl: error: no experiment {exp_id} in nnictl's registry ({nni_io.registry_path()}; "
                         f"known: {', '.join(sorted(registry)) or 'none'})")


def cli(argv=None):
    # not resolved: a venv's bin/python is a link out of it, and its own dir is what puts the venv first
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    patch_launcher()
    warnings.filterwarnings("ignore", "pkg_resources is deprecated")  # nnictl's own import, a line before every answer
    from nni.tools.nnictl.nnictl import parse_args
    sys.argv = ["nnictl", *(sys.argv[1:] if argv is None else argv)]
    if sys.argv[1:2] == ["resume"] and len(sys.argv) > 2 and not sys.argv[2].startswith("-"):
        known(sys.argv[2])
        mark_stopped(sys.argv[2])
        stop_left_on_servers(sys.argv[2])
        leftovers.stop(sys.argv[2])
    sys.exit(parse_args())


if __name__ == "__main__":
    cli()
