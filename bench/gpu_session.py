"""The one command a lent GPU machine is asked to run: its figures, in priority order, under one deadline, each
phase's results written the moment it ends into a folder that comes home.

    python3 -m bench.gpu_session --wheelhouse .whl --out "$OUT"        # a GPU machine without a package index
    python3 -m bench.gpu_session --tiny --out /tmp/session             # the same script on the CPU (CI runs it)

Phases (each writes <out>/<phase>.json; <out>/session.log has a line per phase, session.json the whole):
  machine   nvidia-smi, Python, torch, torchvision, timm, CUDA and cuDNN versions, the cores this process may use
  install   the wheelhouse (python -m bench.wheelhouse) pip-installed into this interpreter with no index, then
            NNI's own GPU-info collector (what its scheduler runs): no trial trains unless NNI sees the GPU
  bench     bench/benchmark.py's b/a (train.py's images/s over the bare step) for EfficientNet-Lite0 and
            efficientnet_b0 at 224x224 and BaseModel at 128x96, --amp --channels_last, and cuDNN autotuning's verdict
  workflow  bench/gpu_workflow.py (config_gpu.yml's search, finalize's winner, greedy and soup, the defaults' seeds
            and K-fold vote), cut to the time left: the cut is chosen by counting the training processes each
            phase starts and the wall time of one (bench's lite0 train.py run)
  startup   bench/startup.py --gpu: where a trial's time goes before it trains, if time remains
A phase starts only with enough time left for it; on the deadline, a failure or a signal, the NNI experiments this
session started (on its own ports) are stopped, and the last line says what finished and what did not.
Files stay at most one folder deep and far under 16 MB (the device tool brings back 8 files).
"""
import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.searches import DEADLINE_EXIT, ROOT
from core.cli import Parser, UserError, run_main
from core.signals import STOP
from search import nni_io

PHASES = ("machine", "install", "bench", "workflow", "startup")
# The workflow's cuts, largest first: (seeds, trials, finalize --top, --k). The full one is gpu_workflow's defaults.
CUTS = ((3, 8, 2, 5), (2, 8, 2, 3), (2, 4, 1, 3), (2, 4, 1, 2))  # each stage is at least one wave: 3 is the fewest
PARALLEL = 4  # config_gpu.yml's trialConcurrency: trials (and folds) share the GPU four at a time
SHARED = 1.5  # a wave of PARALLEL trials on one GPU against one trial alone (most of a short trial is start-up): a guess
FIXED_S = 90  # a workflow's cost beside its trainings: the drawn set, two NNI managers' starts, three finalize runs
WORKFLOW_FLOOR_S = 30  # the least time a workflow is given
TINY = dict(deadline=15.0, bench_models=[("BaseModel", (64, 48))], startup_args=["--people", "14", "--repeats", "1", "--resize", "64", "48"])


def build_parser():
    p = Parser(prog="gpu_session.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="where the results go (default: $OUT)")
    p.add_argument("--wheelhouse", type=Path, default=None, help="wheels to install first (python -m bench.wheelhouse DIR)")
    p.add_argument("--deadline", type=float, default=9.0, help="minutes for everything, install included")
    p.add_argument("--tiny", action="store_true", help="the same phases on the CPU, tiny: a check that they run, not figures")
    p.add_argument("--port", type=int, default=8095, help="the workflow's search port (finalize's folds: the next)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    return p


class Session:
    """The deadline, the output folder and the record of what finished."""

    def __init__(self, out, deadline_s, work):
        self.out, self.work, self.end = out, work, time.monotonic() + deadline_s
        self.status = {}  # phase -> "done", "failed: ...", "skipped: ..."

    def left(self):
        return self.end - time.monotonic()

    def log(self, line):
        print(line, flush=True)
        with open(self.out / "session.log", "a") as f:
            f.write(line + "\n")

    def write(self, name, result):
        tmp = self.out / f".{name}.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(self.out / f"{name}.json")  # a deadline's kill never leaves half a file

    def phase(self, name, run, needs_s=0):
        """Run one phase if needs_s seconds are left; its result (or its error) is written as it ends."""
        if self.left() < needs_s:
            self.status[name] = f"skipped: {self.left():.0f} s left, it needs {needs_s:.0f}"
            self.log(f"{name}: {self.status[name]}")
            return None
        t0 = time.monotonic()
        try:
            result = run()
            self.status[name] = "done"
        except Exception as e:  # a phase's failure must not cost the phases after it; a bug keeps its traceback
            result = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
            self.status[name] = f"failed: {type(e).__name__}: {e}"
        result = dict(result or {}, seconds=round(time.monotonic() - t0, 1))
        self.write(name, result)
        self.log(f"{name}: {self.status[name][:300]} ({result['seconds']:.0f} s)")
        return result

    def run(self, cmd, name, timeout=None):
        """A child process in its own process group, its output in the work folder -> (exit code, the output's tail).
        Past the deadline (or timeout) it gets SIGINT, then SIGKILL 20 s later."""
        log = self.work / f"{name}.log"
        timeout = max(min(timeout or self.left(), self.left()), 1)
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                    env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                                             PYTHONUNBUFFERED="1"))
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                code = stop_group(proc)
        return code, log.read_text()[-4000:]


def stop_group(proc):
    """SIGINT to the child's process group (each tool's own clean stop), SIGKILL if it has not ended in 20 s."""
    for signum, wait in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, signum)
            return proc.wait(wait)
        except ProcessLookupError:
            return proc.wait()
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def machine(session):
    probe = ("import json, os, platform, torch, torchvision, timm; print(json.dumps(dict(python=platform.python_version(), "
             "executable=os.sys.executable, torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__, "
             "cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=torch.cuda.get_device_name(0) "
             "if torch.cuda.is_available() else None, cores=len(os.sched_getaffinity(0)))))")
    code, out = session.run([sys.executable, "-c", probe], "machine", timeout=120)
    if code:
        raise RuntimeError(f"the versions probe failed: {out.strip()[-300:]}")
    result = json.loads(out.strip().splitlines()[-1])
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    return dict(result, nvidia_smi=smi.stdout.strip() if smi else None)


def install(session, folder, gpu):
    """The wheelhouse into this interpreter, no index; then NNI's GPU-info collector, as its scheduler runs it."""
    result = {}
    if folder:
        code, out = session.run([sys.executable, "-m", "bench.wheelhouse", str(folder), "--install"], "install", timeout=300)
        if code:
            raise RuntimeError(f"--wheelhouse {out.strip().splitlines()[-1].removeprefix('wheelhouse.py: error: ') if out.strip() else code}")
        result["installed"] = out.strip().splitlines()[-1]
    code, out = session.run([sys.executable, "-m", "nni.tools.nni_manager_scripts.collect_gpu_info", "--detail"], "gpu_info", timeout=60)
    info = json.loads(out.strip().splitlines()[-1]) if code == 0 and out.strip() else dict(success=False, output=out[-500:])
    result["nni_gpu_info"] = info
    if gpu and not (info.get("success") and info.get("gpuNumber", len(info.get("gpus", []))) > 0):
        raise RuntimeError(f"NNI's GPU-info collector sees no GPU ({json.dumps(info)[:300]}): its scheduler would start no trial")
    return result


def bench(session, models, tiny):
    """b/a per model: bench/benchmark.py --json, one run per input size."""
    rows = []
    for size in dict.fromkeys(size for _, size in models):
        names = [name for name, s in models if s == size]
        path = session.work / f"bench_{size[0]}x{size[1]}.json"
        cmd = [sys.executable, "-m", "bench.benchmark", "--models", *names, "--resize", *map(str, size), "--skip_memory",
               "--skip_nocache", "--json", str(path)]
        cmd += ["--epochs", "2", "--timed_seconds", "1", "--steps", "2"] if tiny else \
            ["--device", "cuda", "--amp", "--channels_last", "--cudnn_benchmark", "--timed_seconds", "8"]
        code, out = session.run(cmd, f"bench_{size[0]}x{size[1]}")
        if code:
            raise RuntimeError(f"benchmark.py {' '.join(names)} failed ({code}): {out.strip()[-300:]}")
        rows += json.loads(path.read_text())["rows"]
    return dict(rows=rows, goal="b/a >= 0.95")


def workflow_minutes(cut, trial_s):
    """Expected minutes of a workflow cut, from the training processes it starts: the defaults' seeds, the search's
    trials and the finalists' folds (--top plus the defaults, at most), each in waves of PARALLEL on the GPU, a wave
    SHARED x one trial's wall time; plus FIXED_S."""
    seeds, trials, top, k = cut
    waves = math.ceil(seeds / PARALLEL) + math.ceil(trials / PARALLEL) + math.ceil((top + 1) * k / PARALLEL)
    return (FIXED_S + waves * SHARED * trial_s) / 60


def choose_cut(left_s, trial_s):
    """The largest cut expected to end with a minute to spare, or None."""
    return next((c for c in CUTS if workflow_minutes(c, trial_s) * 60 + 60 <= left_s), None)


def workflow(session, cli, trial_s):
    results = session.work / "workflow.json"
    if cli.tiny:
        cut, cmd = None, ["--tiny"]
    else:
        cut = choose_cut(session.left(), trial_s)
        if cut is None:
            raise RuntimeError(f"{session.left():.0f} s left: even the smallest cut needs {workflow_minutes(CUTS[-1], trial_s):.1f} min")
        cmd = ["--seeds", str(cut[0]), "--trials", str(cut[1]), "--top", str(cut[2]), "--k", str(cut[3])]
    deadline = max(session.left() - 45, WORKFLOW_FLOOR_S) / 60  # it stops its own experiments before this session must
    argv = [sys.executable, "-m", "bench.gpu_workflow", *cmd, "--work", str(session.work / "workflow"), "--results", str(results),
            "--port", str(cli.port), "--deadline", f"{deadline:.2f}"]
    session.log(f"workflow: {shlex.join(argv[1:])}" + (f" (expected {workflow_minutes(cut, trial_s):.1f} min)" if cut else ""))
    try:
        code, out = session.run(argv, "workflow")
    finally:
        stopped = stop_experiments(cli.port, cli.port + 1)
    result = json.loads(results.read_text()) if results.is_file() else {}
    result.update(cut=dict(zip(("seeds", "trials", "top", "k"), cut)) if cut else "tiny", stopped_here=stopped, exit_code=code,
                  expected_minutes=workflow_minutes(cut, trial_s) if cut else None)
    if code:
        result["log_tail"] = out[-2000:]
        session.write("workflow", result)
        how = "cut by its deadline" if code == DEADLINE_EXIT else f"gpu_workflow.py ended with {code}"
        raise RuntimeError(f"{how}; finished: {', '.join(result.get('finished', [])) or 'nothing'}")
    return result


def stop_experiments(*ports):
    """nnictl stop for each of this session's ports where a manager still answers: its experiments, none other."""
    stopped = []
    for port in ports:
        try:
            nni_io.rest(port, "check-status")
        except Exception:  # nothing there: the workflow stopped it, or it never started
            continue
        nni_io.nnictl("stop", "--port", str(port))
        stopped.append(port)
    return stopped


def startup(session, tiny):
    work = session.work / "startup"
    cmd = [sys.executable, "-m", "bench.startup", "--work", str(work), *(TINY["startup_args"] if tiny else ["--gpu"])]
    code, out = session.run(cmd, "startup")
    if code:
        raise RuntimeError(f"startup.py failed ({code}): {out.strip()[-300:]}")
    return json.loads((work / "startup.json").read_text())


def main(argv=None):
    parser = build_parser()
    cli = parser.parse_args(argv)
    if cli.tiny:  # its own deadline; one given still wins
        parser.set_defaults(deadline=TINY["deadline"])
        cli = parser.parse_args(argv)
    if cli.out is None:
        raise UserError("--out is not given and $OUT is not set: the results need a folder")
    cli.out.mkdir(parents=True, exist_ok=True)
    deadline_s = cli.deadline * 60
    work = (cli.work or Path(tempfile.mkdtemp(prefix="gpu-session-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    session = Session(cli.out.resolve(), deadline_s, work)
    session.log(f"gpu_session: deadline {deadline_s / 60:.1f} min, results in {session.out}, scratch {work}")
    STOP.install()  # SIGTERM too ends the session through its finally: its experiments stopped, its last line said
    trial_s = 45.0  # a lite0 train.py run on the H200, until bench measures this machine's
    try:
        info = session.phase("machine", lambda: machine(session)) or {}
        gpu = info.get("gpu")
        if not (gpu or cli.tiny):
            raise UserError("no CUDA GPU here: this session measures a GPU (--tiny runs its phases on the CPU)")
        session.phase("install", lambda: install(session, cli.wheelhouse, gpu))
        if session.status["install"] != "done":
            raise RuntimeError("the install failed: nothing after it can run")
        models = TINY["bench_models"] if cli.tiny else [("timm/tf_efficientnet_lite0", (224, 224)), ("efficientnet_b0", (224, 224)),
                                                        ("BaseModel", (128, 96))]
        figures = session.phase("bench", lambda: bench(session, models, cli.tiny), needs_s=60)
        trial_s = next((r["trial_wall_s"] for r in (figures or {}).get("rows", []) if "lite0" in r["model"]), trial_s)
        session.phase("workflow", lambda: workflow(session, cli, trial_s),  # --tiny: the floor of the deadline it is given
                      needs_s=WORKFLOW_FLOOR_S if cli.tiny else workflow_minutes(CUTS[-1], trial_s) * 60 + 60)
        session.phase("startup", lambda: startup(session, cli.tiny), needs_s=60 if cli.tiny else 150)
    except KeyboardInterrupt:
        session.log("interrupted")
    except (ValueError, RuntimeError) as e:
        session.log(f"stopped: {e}")
    finally:
        stop_experiments(cli.port, cli.port + 1)
        done = [p for p in PHASES if session.status.get(p) == "done"]
        rest = [f"{p} ({session.status.get(p, 'not started')})" for p in PHASES if p not in done]
        session.write("session", dict(status=session.status, finished=done, deadline_min=deadline_s / 60, tiny=cli.tiny))
        session.log(f"finished: {', '.join(done) or 'nothing'}; not finished: {', '.join(rest) or 'none'}")
    if rest:
        sys.exit(1)


def cli(argv=None):
    return run_main("gpu_session.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
