"""Real NNI 3.0 experiments: `nnictl create` locally and over SSH (a throwaway sshd on
127.0.0.1), train.py trials on the tiny demo data, results read back through the REST
API, the trials' own files (checkpoints, TensorBoard events) and baseline/experiment.py.

Every experiment gets its own port, working directory and HOME (so nnictl's registry
stays out of the real ~/nni-experiments) and is stopped in a finally block.
"""
import contextlib
import json
import math
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from baseline import experiment as expmod
from baseline.preflight import gpu_problem
from conftest import ROOT, TINY
from sshd import free_port, start_sshd
from training import flags

BIN = Path(sys.executable).parent
NNICTL = BIN / "nnictl"
FINISHED = {"SUCCEEDED", "EARLY_STOPPED", "USER_CANCELED", "FAILED", "SYS_CANCELED"}


# ----------------------------------------------------------------------------- helpers
def nni_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(home)
    env["MPLCONFIGDIR"] = str(Path(home) / "mpl")
    env["OMP_NUM_THREADS"] = "1"
    return env


def load_yaml(name):
    return yaml.safe_load((ROOT / name).read_text())


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


def rest(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni/{path}", timeout=10) as r:
        return json.loads(r.read().decode())


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
            status = rest(self.port, "check-status")
            if status["status"] in ("DONE", "ERROR", "STOPPED"):
                break
            time.sleep(2)
        assert status and status["status"] == "DONE", f"experiment not DONE in {timeout} s: {status}\n{self.diagnose()}"
        return status


@contextlib.contextmanager
def nni_experiment(config, workdir, home):
    """nnictl create on a free port; always nnictl stop at the end."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = dict(config, experimentWorkingDirectory=str(workdir / "exps"))
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = nni_env(home)
    port = free_port()
    proc = subprocess.run([str(NNICTL), "create", "--config", str(path), "--port", str(port)], env=env,
                          capture_output=True, text=True, timeout=180)
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    found = re.search(r"Experiment ID: (\w+)", out)
    try:
        assert proc.returncode == 0 and found, f"nnictl create failed ({proc.returncode}):\n{out}"
        yield Running(port, found.group(1), workdir, env)
    finally:
        stop = [str(NNICTL), "stop", found.group(1)] if found else [str(NNICTL), "stop", "--port", str(port)]
        subprocess.run(stop, env=env, capture_output=True, timeout=120)


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
    killed = set(expmod.ASSESSOR_STOP.findall(run.manager_log()))
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
        for key, value in expmod.flatten(t.params).items():
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


# ----------------------------------------------------------------------------- static checks
def _values_to_try(spec):
    kind, bounds = spec["_type"], spec["_value"]
    if kind == "choice":
        return bounds
    return [bounds[0], bounds[1]]


@pytest.mark.parametrize("where", ["search_space.json", "config_local.yml"])
def test_search_space_keys_and_values_are_train_flags(where):
    space = json.loads((ROOT / where).read_text()) if where.endswith(".json") else load_yaml(where)["searchSpace"]
    parser = flags.build_parser()
    base = parser.parse_args([])
    assert {"lr", "batch_size", "optimizer", "weight_decay", "augmentation", "head", "criterion"} <= set(space)
    assert space["lr"]["_type"] == "loguniform"
    assert any(isinstance(c, dict) and c["_name"] == "focal" and "focal_gamma" in c for c in space["criterion"]["_value"])
    for key, spec in space.items():
        for value in _values_to_try(spec):
            if isinstance(value, dict):  # nested choice: its own hyperparameters at both ends
                for sub, sub_spec in (kv for kv in value.items() if kv[0] != "_name"):
                    for v in _values_to_try(sub_spec):
                        flags.apply_params(parser, base, {key: {"_name": value["_name"], sub: v}}, where)
                flags.apply_params(parser, base, {key: {"_name": value["_name"]}}, where)
            else:
                flags.apply_params(parser, base, {key: value}, where)  # raises on unknown key / bad value
    if where == "search_space.json":
        assert len(space["model"]["_value"]) >= 3


def test_config_remote_is_valid_and_schedules_on_one_gpu_hosts(tmp_path):
    from nni.experiment.config import ExperimentConfig
    raw = load_yaml("config_remote.yml")
    assert raw["nniManagerIp"] and raw["trainingService"]["platform"] == "remote"
    assert "--data_dir" in shlex.split(raw["trialCommand"])
    machines = raw["trainingService"]["machineList"]
    assert len(machines) == 2
    key = tmp_path / "key"
    key.write_text("placeholder")
    for m in machines:
        assert m["pythonPath"].endswith("/bin") and "password" not in m and m["sshKeyFile"]
        # a 1-GPU host must be able to take a trial (NNI 3.0 refuses requests for all of a host's GPUs)
        assert gpu_problem(1, raw.get("trialGpuNumber"), m.get("maxTrialNumberPerGpu", 1), m.get("gpuIndices")) is None
        m["sshKeyFile"] = str(key)
    cwd = os.getcwd()
    os.chdir(ROOT)  # relative paths in the config are relative to it
    try:
        ExperimentConfig(**raw).validate()
        ExperimentConfig.load(str(ROOT / "config_local.yml")).validate()
    finally:
        os.chdir(cwd)


def test_nniignore_keeps_data_and_envs_out():
    lines = {l.strip() for l in (ROOT / ".nniignore").read_text().splitlines() if l.strip() and not l.startswith("#")}
    assert {"data/", "runs/", ".git/", ".venv/", "venv*/", "__pycache__/"} <= lines


# NNI's own walk over the code directory (nni_node/common/tarball.js) with its own matcher (the `ignore`
# package it ships): directories are asked with a trailing separator, and an ignored one is not entered.
NNI_WALK = """
const fs = require('fs'), path = require('path');
const ig = require(process.argv[1] + '/node_modules/ignore')().add(fs.readFileSync(process.argv[2] + '/.nniignore', 'utf8'));
function* walk(root, rel) {
  for (const entry of fs.readdirSync(path.join(root, rel)).sort()) {
    const relEntry = path.join(rel, entry), isDir = fs.lstatSync(path.join(root, relEntry)).isDirectory();
    if (ig.ignores(relEntry + (isDir ? path.sep : ''))) continue;
    if (isDir) yield* walk(root, relEntry); else yield relEntry;
  }
}
console.log(JSON.stringify([...walk(process.argv[2], '')]));
"""


def test_nniignore_keeps_secrets_out_by_nnis_own_matcher(tmp_path):
    import nni_node
    node_dir = Path(nni_node.__file__).parent
    shutil.copy(ROOT / ".nniignore", tmp_path / ".nniignore")
    secrets = [".ssh/id_ed25519", "id_rsa", "id_rsa.pub", "keys/id_ecdsa", "server.pem", "tls/server.key", ".env", ".env.local",
               ".netrc", ".aws/credentials", ".kaggle/kaggle.json", "cert.p12", "data/demo/train/train.csv", "runs/exp/best.pth"]
    code = ["train.py", "model.py", "training/checkpoint.py", "baseline/kfold.py", "search_space.json", "config_remote.yml"]
    for name in secrets + code:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    out = subprocess.run([str(node_dir / "node"), "-e", NNI_WALK, str(node_dir), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    uploaded = set(json.loads(out))
    assert uploaded == set(code) | {".nniignore"}, uploaded


def test_best_command_from_params():
    params = {"lr": 0.001, "batch_size": 64.0, "criterion": {"_name": "focal", "focal_gamma": 2.5},
              "resize": [64, 48], "freeze_backbone": True, "pretrained": False, "head": "512-256"}
    cmd = expmod.best_command("python3 train.py --data_dir '/data/my set' --lr 0.1 --epochs 20 --freeze_backbone", params)
    assert shlex.split(cmd) == ["python3", "train.py", "--data_dir", "/data/my set", "--epochs", "20",
                                "--lr", "0.001", "--batch_size", "64", "--criterion", "focal", "--focal_gamma", "2.5",
                                "--resize", "64", "48", "--freeze_backbone", "--head", "512-256"]
    args = flags.build_parser().parse_args(shlex.split(cmd)[2:])
    assert args.criterion == "focal" and args.focal_gamma == 2.5 and args.batch_size == 64 and args.resize == [64, 48]


def test_trial_budget_becomes_epochs_in_the_best_command():
    """Hyperband's TRIAL_BUDGET is shown, and re-run, as the --epochs train.py trained."""
    params = {"TRIAL_BUDGET": 4, "lr": 0.01}
    assert expmod.flatten(params) == {"epochs": 4, "lr": 0.01}
    cmd = expmod.best_command("python3 train.py --epochs 13 --resize 64 48", params)
    assert shlex.split(cmd) == ["python3", "train.py", "--resize", "64", "48", "--lr", "0.01", "--epochs", "4"]


def test_hyperband_parameter_ids_are_kept_as_text():
    rows = [("a1", "SUCCEEDED", 0, [{"parameter_id": "0-2_0_0", "parameters": {"lr": 0.01, "TRIAL_BUDGET": 1}}], ""),
            ("b2", "SUCCEEDED", 1, [{"parameter_id": "0-2_1_0", "parameters": {"lr": 0.01, "TRIAL_BUDGET": 4}}], "")]
    metrics = [("a1", "0-2_0_0", "FINAL", '"0.5"'), ("b2", "0-2_1_0", "FINAL", '"0.7"')]
    exp = expmod._assemble("x", "DONE", {}, rows, metrics, "test", ({}, set()))
    assert [(t.parameter_id, t.params["TRIAL_BUDGET"], t.metric) for t in expmod.ranked(exp)] == [("0-2_1_0", 4, 0.7), ("0-2_0_0", 1, 0.5)]


def test_assessor_stop_is_listed_as_early_stopped(tmp_path):
    """NNI 3.0 lists an assessor stop as USER_CANCELED; the summary tells it from a user's
    cancel by nnimanager.log (lines as NNI 3.0 writes them)."""
    (tmp_path / "nnimanager.log").write_text(
        '[2026-11-24 03:59:07] INFO (LocalV3.local) Trial parameter: tl7g8 {"parameter_id": 1, '
        '"parameter_source": "algorithm", "parameters": {"lr": 0.01}}\n'
        '[2026-11-24 03:59:22] INFO (NNIManager) cancelTrialJob: "tl7g8"\n'
        '[2026-11-24 04:00:01] INFO (NNIManager) User cancelTrialJob: Ab3dE\n')
    rows = [("tl7g8", "USER_CANCELED", 1, [], ""), ("Ab3dE", "USER_CANCELED", 2, [], "")]
    exp = expmod._assemble("x", "DONE", {}, rows, [], "test", expmod.read_manager_log(tmp_path))
    assert {t.id: t.status for t in exp.trials} == {"tl7g8": "EARLY_STOPPED", "Ab3dE": "USER_CANCELED"}
    assert exp.trials[0].params == {"lr": 0.01}


def test_safe_tpe_survives_swapped_parameters():
    """NNI 3.0 (concurrency > 1): the trial that ran parameter id 1 is listed, and ends, as id 0."""
    from baseline.nni_tuner import SafeTPE
    tuner = SafeTPE(optimize_mode="maximize")
    tuner.update_search_space({"lr": {"_type": "loguniform", "_value": [1e-4, 1e-2]}})
    p0, p1 = tuner.generate_parameters(0), tuner.generate_parameters(1)
    tuner.receive_trial_result(1, p1, 0.5)
    tuner.trial_end(0, True)                 # the dispatcher's (wrong) id from the trial list
    tuner.receive_trial_result(0, p0, 0.7)   # stock TpeTuner: KeyError 0, the dispatcher dies
    tuner.trial_end(1, True)
    assert 1e-4 <= tuner.generate_parameters(2)["lr"] <= 1e-2


def are_train_defaults(params):
    """NNI parameters that leave every train.py flag at its default."""
    parser = flags.build_parser()
    return flags.apply_params(parser, parser.parse_args([]), params, "NNI parameters") == parser.parse_args([])


def test_safe_tpe_starts_from_train_defaults():
    from baseline.nni_tuner import SafeTPE
    space = load_yaml("config_local.yml")["searchSpace"]
    tuner = SafeTPE(optimize_mode="maximize", start_from_defaults=True, seed=1, tpe_args=dict(n_startup_jobs=2))
    tuner.update_search_space(space)
    first = tuner.generate_parameters(0)
    assert set(first) == set(space) and first["criterion"] == {"_name": flags.build_parser().parse_args([]).criterion}
    assert are_train_defaults(first)  # the first trial is `python train.py`
    tuner.receive_trial_result(0, first, 0.9)  # TPE models it like any other result
    later = [tuner.generate_parameters(i) for i in range(1, 4)]
    assert all(p != first for p in later)
    for i, p in enumerate(later, 1):
        tuner.receive_trial_result(i, p, 0.5)
    assert len(tuner._history["lr",]) == 4


@pytest.mark.parametrize("space,message", [
    ({"lr": {"_type": "loguniform", "_value": [0.01, 0.1]}}, r"default lr=0.002 is outside loguniform \[0.01, 0.1\]"),
    ({"optimizer": {"_type": "choice", "_value": ["SGD"]}}, r"default optimizer='AdamW' is not among \['SGD'\]"),
    ({"criterion": {"_type": "choice", "_value": [{"_name": "focal", "focal_gamma": {"_type": "uniform", "_value": [1, 3]}}]}},
     r"default criterion='cross_entropy' is not among \['focal'\]"),
    ({"learning_rate": {"_type": "choice", "_value": [0.1]}}, r"key 'learning_rate' is not a train.py flag"),
])
def test_safe_tpe_refuses_defaults_outside_the_space(space, message):
    from baseline.nni_tuner import SafeTPE
    with pytest.raises(ValueError, match=message):
        SafeTPE(optimize_mode="maximize", start_from_defaults=True).update_search_space(space)
    SafeTPE(optimize_mode="maximize").update_search_space(space)  # without the option the space is TPE's business


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")  # BOHB's ConfigSpace/statsmodels calls
@pytest.mark.parametrize("name,class_args", [("Hyperband", dict(R=4, eta=2)), ("BOHB", dict(min_budget=1, max_budget=4, eta=2))])
def test_safe_advisors_survive_their_string_parameter_ids(monkeypatch, name, class_args):
    """NNI 3.0's stock Hyperband and BOHB raise TypeError at the first metric (their ids are strings); the Safe ones
    take the results and promote the better half of a round with twice the budget."""
    import nni.runtime.msg_dispatcher_base as base
    from baseline import nni_tuner
    monkeypatch.setattr(base, "dispatcher_env_vars", base.dispatcher_env_vars._replace(NNI_TUNER_COMMAND_CHANNEL="ws://_unittest_"))
    safe = getattr(nni_tuner, f"Safe{name}")
    for cls in (safe.__bases__[1], safe):
        sent = []
        advisor = cls(optimize_mode="maximize", **class_args)
        advisor.send = lambda command, data: sent.append(json.loads(data) if data else None)
        advisor.handle_initialize({"lr": {"_type": "loguniform", "_value": [1e-4, 1e-2]}})
        advisor.handle_request_trial_jobs(4)
        jobs = [j for j in sent if j and "parameter_id" in j]
        assert [j["parameters"]["TRIAL_BUDGET"] for j in jobs] == [1, 1, 1, 1]
        report = [dict(parameter_id=j["parameter_id"], trial_job_id=f"t{i}", type="FINAL", sequence=0, value=json.dumps(i / 10))
                  for i, j in enumerate(jobs)]
        if cls is not safe:
            with pytest.raises(TypeError, match="'<=' not supported"):
                advisor.handle_report_metric_data(report[0])
            continue
        for data, job in zip(report, jobs):
            advisor.handle_report_metric_data(data)
            advisor.handle_trial_end(dict(trial_job_id=data["trial_job_id"], event="SUCCEEDED", hyper_params=json.dumps(job)))
        advisor.handle_request_trial_jobs(2)
        promoted = [j for j in sent if j and "parameter_id" in j][4:6]
        assert [j["parameters"]["TRIAL_BUDGET"] for j in promoted] == [2, 2]
        assert {j["parameters"]["lr"] for j in promoted} == {jobs[3]["parameters"]["lr"], jobs[2]["parameters"]["lr"]}


def commented_hyperband(config_text):
    """The Hyperband tuner config_local.yml offers in a comment, uncommented."""
    lines = config_text.splitlines()
    start = lines.index("#   tuner:")
    block = [l[1:] for l in lines[start:] if l.startswith("#   ")]
    block = block[:next((i for i, l in enumerate(block[1:], 1) if not l.startswith("     ")), len(block))]
    return yaml.safe_load("\n".join(block))["tuner"]


def test_configs_leave_most_trials_to_the_tuners_model():
    for name in ("config_local.yml", "config_remote.yml"):
        raw = load_yaml(name)
        startup = raw["tuner"]["classArgs"]["tpe_args"]["n_startup_jobs"]
        assert 2 <= startup <= raw["maxTrialNumber"] / 3, (name, startup)
    raw = load_yaml("config_local.yml")
    words = shlex.split(raw["trialCommand"])
    tuner = commented_hyperband((ROOT / "config_local.yml").read_text())
    assert tuner["className"] == "baseline.nni_tuner.SafeHyperband" and tuner["codeDirectory"] == "."
    epochs = int(words[words.index("--epochs") + 1])
    assert tuner["classArgs"]["R"] == epochs  # the longest trial = the TPE trials' length
    # the comment's arithmetic, from NNI's own brackets: one pass, its trials, their shortest and total epochs
    claim = re.search(r"maxTrialNumber to (\d+): one pass through its brackets is \1 trials of (\d+) to (\d+)\s+#\s+"
                      r"epochs, (\d+) epochs in all \(12 trials of (\d+) epochs are (\d+)\)", (ROOT / "config_local.yml").read_text())
    from nni.algorithms.hpo.hyperband_advisor import Bracket
    R, eta = tuner["classArgs"]["R"], tuner["classArgs"]["eta"]
    s_max = math.floor(math.log(R, eta) + 1e-6)
    rounds = []
    for s in range(s_max, -1, -1):
        bracket = Bracket(s, s, s_max, eta, R, "maximize")
        for i in range(s + 1):
            bracket.i = i
            rounds.append(bracket.get_n_r())
    trials, budget = sum(n for n, _ in rounds), sum(n * r for n, r in rounds)
    assert claim and tuple(map(int, claim.groups())) == (trials, min(r for _, r in rounds), R, budget, epochs, 12 * epochs)
    assert raw["maxTrialNumber"] == 12
    from nni.experiment.config import ExperimentConfig
    alternative = {k: v for k, v in raw.items() if k != "assessor"}
    alternative.update(tuner=tuner, maxTrialNumber=trials)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        ExperimentConfig(**alternative).validate()
    finally:
        os.chdir(cwd)


# ----------------------------------------------------------------------------- real experiments
def test_local_experiment(tmp_path, demo_dir, cache_dir, nni_home):
    epochs, trials = 2, 4
    config = local_config(demo_dir, cache_dir, trials, epochs)
    with nni_experiment(config, tmp_path / "local", nni_home) as run:
        run.wait_done(300)
        exp = expmod.from_rest(run.port)
        assert len(exp.trials) == trials
        check_trials(run, exp, lambda t: Path(t.log_path), epochs, config["searchSpace"])
        assert any(t.status == "SUCCEEDED" for t in exp.trials)
        assert are_train_defaults(min(exp.trials, key=lambda t: t.sequence).params)  # start_from_defaults

        # the summary tool against the live REST API
        out = subprocess.run([sys.executable, str(ROOT / "baseline" / "experiment.py"), "--port", str(run.port),
                              "--csv", str(tmp_path / "trials.csv")], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        best = expmod.best_trial(exp)
        assert f"best trial {best.id}" in out.stdout
        command = out.stdout.strip().splitlines()[-1]
        assert command.startswith(shlex.quote(sys.executable) + " train.py") and "--criterion" in command
        args = flags.build_parser().parse_args(shlex.split(command)[2:])
        assert args.epochs == epochs and args.lr == pytest.approx(best.params["lr"])
        rows = (tmp_path / "trials.csv").read_text().strip().splitlines()
        assert len(rows) == trials + 1 and rows[1].split(",")[1] == best.id

    # stopped: the same table from nnictl's registry and the experiment's nni.sqlite
    out = subprocess.run([sys.executable, str(ROOT / "baseline" / "experiment.py"), "--id", run.id],
                         env=nni_env(nni_home), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "nni.sqlite" in out.stdout and f"best trial {best.id}" in out.stdout
    check_fetch(exp, run.id, nni_home, tmp_path, lambda t: Path(t.log_path))


def check_fetch(exp, exp_id, nni_home, tmp_path, out_dir_of):
    """experiment.py --fetch on real trial dirs: a finished one comes whole, as its summary.json lists it; one
    without summary.json (an assessor's stop) is refused in one line naming what it has, and --partial takes it."""
    def fetch(trial, out, *extra):
        return subprocess.run([sys.executable, str(ROOT / "baseline" / "experiment.py"), "--id", exp_id, "--fetch", trial.id,
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


def test_remote_experiment_over_ssh(tmp_path, demo_dir, cache_dir, nni_home):
    epochs, trials = 2, 4
    config = local_config(demo_dir, cache_dir, trials, epochs)
    # as config_remote.yml: two trials at once, with its tuner (SafeTPE: see baseline/nni_tuner.py)
    config.update(trialConcurrency=2, tuner=repo_tuner(load_yaml("config_remote.yml")))
    with start_sshd(tmp_path / "sshd") as sshd:
        config["nniManagerIp"] = "127.0.0.1"
        config["trainingService"] = {"platform": "remote", "machineList": [{
            "host": sshd.host, "port": sshd.port, "user": sshd.user, "sshKeyFile": str(sshd.key_file),
            "pythonPath": str(BIN)}]}
        remote_home = Path(pwd.getpwnam(sshd.user).pw_dir)
        exp_id = None
        try:
            with nni_experiment(config, tmp_path / "remote", nni_home) as run:
                exp_id = run.id
                run.wait_done(420)
                exp = expmod.from_rest(run.port)
                assert len(exp.trials) == trials
                # logPath is "host:~/nni-experiments/<exp>/environments/<env>/trials/<id>" on the server
                for t in exp.trials:
                    assert t.log_path.startswith(f"{sshd.host}:~/nni-experiments/{run.id}/"), t.log_path

                def out_dir(t):
                    return remote_home / t.log_path.split(":~/", 1)[1]
                check_trials(run, exp, out_dir, epochs, config["searchSpace"])
                assert "Installed nni v3.0" in run.manager_log()  # the remote `pip install nni --upgrade` kept 3.0
                # the code went up as a tarball without what .nniignore excludes
                code = remote_home / "nni-experiments" / run.id / "environments" / "remote-worker1" / "upload" / "trial_code"
                assert (code / "train.py").is_file() and not (code / ".git").exists() and not (code / ".venv").exists()
            check_fetch(exp, exp_id, nni_home, tmp_path, out_dir)  # stopped: from its nni.sqlite, over SSH
        finally:
            if exp_id:
                shutil.rmtree(remote_home / "nni-experiments" / exp_id, ignore_errors=True)


def test_invalid_parameter_fails_its_trial_only(tmp_path, demo_dir, cache_dir, nni_home):
    config = local_config(demo_dir, cache_dir, 3, 1)
    config["trialConcurrency"] = 2
    config["searchSpace"] = {"optimizer": {"_type": "choice", "_value": ["AdamW", "NoSuchOptimizer", "SGD"]}}
    config["tuner"] = {"name": "GridSearch"}
    del config["assessor"]
    with nni_experiment(config, tmp_path / "invalid", nni_home) as run:
        run.wait_done(240)
        exp = expmod.from_rest(run.port)
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


def test_tuners_start_without_bohbs_imports():
    """NNI 3.0 fails an experiment whose tuner has not connected within 10 s: SafeTPE must not pay for BOHB's imports."""
    code = "import sys, baseline.nni_tuner as t; a = 'ConfigSpace' in sys.modules; t.SafeBOHB; print(a, 'ConfigSpace' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.split() == ["False", "True"], out.stderr


@pytest.mark.parametrize("advisor", ["SafeHyperband", "SafeBOHB"])
def test_budgets_and_the_best_trial_reruns_alike(tmp_path, demo_dir, cache_dir, nni_home, advisor):
    """config_local.yml's multi-fidelity alternatives, tiny: each trial trains TRIAL_BUDGET epochs, and the command
    baseline/experiment.py prints for the best trial, run standalone, gives its validation metric again."""
    config = local_config(demo_dir, cache_dir, 3, 2)
    del config["assessor"]
    tuner = commented_hyperband((ROOT / "config_local.yml").read_text())
    budgets = dict(R=2) if advisor == "SafeHyperband" else dict(min_budget=1, max_budget=2)
    tuner.update(codeDirectory=str(ROOT), className=f"baseline.nni_tuner.{advisor}",  # 2 trials of 1 epoch, the better one for 2
                 classArgs=dict(optimize_mode="maximize", eta=2, **budgets))
    config.update(tuner=tuner, searchSpace={"lr": {"_type": "loguniform", "_value": [1e-3, 1e-2]},
                                           "optimizer": {"_type": "choice", "_value": ["AdamW", "SGD"]}})
    with nni_experiment(config, tmp_path / advisor, nni_home) as run:
        run.wait_done(300)
        exp = expmod.from_rest(run.port)
        assert sorted(t.params["TRIAL_BUDGET"] for t in exp.trials) == [1, 1, 2], run.diagnose()
        for t in exp.trials:
            out = Path(t.log_path)
            assert t.status == "SUCCEEDED", run.diagnose([out])
            assert json.loads((out / "config.json").read_text())["epochs"] == t.params["TRIAL_BUDGET"]
            assert len(t.intermediates) == t.params["TRIAL_BUDGET"]
        best = expmod.best_trial(exp)
        out = subprocess.run([sys.executable, str(ROOT / "baseline" / "experiment.py"), "--port", str(run.port), "--json"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    command = json.loads(out.stdout)["command"]
    rerun = subprocess.run([*shlex.split(command), "--model_dir", str(tmp_path / "rerun")], cwd=ROOT, env=nni_env(nni_home),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    found = re.search(r"best val accuracy ([0-9.]+)", rerun.stdout)
    assert found and abs(float(found.group(1)) - best.metric) <= 0.01, (command, rerun.stdout[-500:], best.metric)
