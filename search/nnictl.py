"""nnictl, with time for its manager to start: `imgcls-nnictl create --config config_local.yml`.

NNI 3.0's `nnictl create` (and resume, view) starts its manager (a node process) and asks it for
check-status three times, a second apart; then it kills it and fails with "Create experiment failed:
... /api/v1/nni/check-status ... Connection refused". On a busy machine node can take longer than
that (CI met it). This is nnictl itself with that wait made START_WAIT_S seconds, cut short when the
manager has exited; everything else is stock. The search tools start experiments through it.
"""
import sys
import time

from nni.experiment import launcher

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
    """Make nni.experiment.launcher wait for the manager it started with wait_for_manager."""
    started = []
    stock_start = launcher._start_rest_server

    def start(*args, **kwargs):
        started.append(stock_start(*args, **kwargs))
        return started[-1]

    def check(port, retry=3, url_prefix=None):
        wait_for_manager(port, url_prefix, started[-1] if started else None, wait_s)

    launcher._start_rest_server, launcher._check_rest_server = start, check


def cli(argv=None):
    patch_launcher()
    from nni.tools.nnictl.nnictl import parse_args
    sys.argv = ["nnictl", *(sys.argv[1:] if argv is None else argv)]
    sys.exit(parse_args())


if __name__ == "__main__":
    cli()
