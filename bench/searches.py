"""The benches' NNI searches on the demo data (bench/hpo.py, bench/finalize.py): config_local.yml as every
search starts from it, a search config per method and seed, an experiment run to a budget of trial-epochs,
and a standalone train.py run to compare against."""
import csv
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from core import demo
from core.files import ROOT
from core.metrics import score
from core.runs import HISTORY, SUBMISSION_SOFT, increment_path, read_summary
from search import nni_io
from search.trials import from_rest

BIN = Path(sys.executable).parent
DEADLINE_EXIT = 3  # a bench cut by its --deadline, what finished kept: gpu_session.py tells it from a failure
SIZE = ["--resize", "64", "48"]  # a quarter of the default pixels: the studies fit in hours on 2 cores


def local_config(epochs=None):
    """config_local.yml, its trials' --epochs replaced by `epochs` when given."""
    base = nni_io.load_config(ROOT / "config_local.yml")
    if epochs:
        base["trialCommand"] = shlex.join(nni_io.with_flag(shlex.split(base["trialCommand"]), "--epochs", epochs))
    return base


def trial_epochs(config):
    """The --epochs of a config's trialCommand: every trial's length, and Hyperband's longest."""
    return int(nni_io.flag_value(config["trialCommand"], "--epochs"))


def default_budget(config):
    """Trial-epochs of config_local's own search: its trials x their epochs."""
    return config["maxTrialNumber"] * trial_epochs(config)


def trial_words(config, *extra):
    """config_local.yml's trialCommand with the venv's absolute python (trials must not depend on PATH)."""
    return [sys.executable, "train.py", *nni_io.train_words(config["trialCommand"]), *extra]


def search_config(method, seed, base, work):
    config = dict(experimentName=f"hpo-{method}-{seed}", searchSpace=nni_io.search_space(base, ROOT / "config_local.yml"),
                  trialCommand=shlex.join(trial_words(base, *SIZE, "--seed", str(seed), "--cache_dir", str(work / "cache"))),
                  trialCodeDirectory=str(ROOT), trialConcurrency=1, maxTrialNumber=10000, maxExperimentDuration="3h",
                  experimentWorkingDirectory=str(work / "nni"), trainingService=base["trainingService"])
    if method == "random":
        config["tuner"] = dict(name="Random", classArgs=dict(seed=seed))
    elif method.startswith("tpe"):
        config["tuner"] = dict(base["tuner"], codeDirectory=str(ROOT), classArgs=dict(base["tuner"]["classArgs"], seed=seed))
        config["assessor"] = base["assessor"]
        if method in ("tpe_plain", "tpe_f1"):
            config["tuner"]["classArgs"]["start_from_defaults"] = False
        if method == "tpe_f1":
            config["trialCommand"] += " --metric f1"
        if method == "tpe_reshuffle":
            config["trialCommand"] += " --reshuffle_val"
    else:  # Hyperband draws from an unseeded RandomState: its seeds are repeats
        config["tuner"] = dict(codeDirectory=str(ROOT), className="search.nni_tuner.SafeHyperband",
                               classArgs=dict(optimize_mode="maximize", R=trial_epochs(base), eta=3))
    return config


def run_experiment(config, port, work, budget=None, stall_s=600, deadline_s=None):
    """nnictl create; wait until DONE, until the trials have reported `budget` epochs, or until deadline_s seconds
    have passed since the create; read it back; stop. -> (search.trials.Experiment, the REST trial list, minutes).
    A failed experiment, or one with no new epoch for stall_s seconds, exits; a deadline returns what finished."""
    path = work / f"{config['experimentName']}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    t0, until = time.time(), None if deadline_s is None else time.monotonic() + deadline_s
    code, out = nni_io.nnictl("create", "--config", str(path), "--port", str(port), env=env)
    exp_id = nni_io.exp_id_of(out)
    if code or not exp_id:
        sys.exit(f"nnictl create failed:\n{out}")
    try:
        status = wait_experiment(port, budget, stall_s, until)
        exp, jobs = from_rest(port), nni_io.rest(port, "trial-jobs")
    finally:
        nni_io.nnictl("stop", exp_id, env=env)
    if status in ("ERROR", "STALLED"):
        sys.exit(f"experiment {exp_id} failed or stalled; see {work / 'nni' / exp_id / 'log'}")
    if status == "DEADLINE":
        done = sum(t.status == "SUCCEEDED" for t in exp.trials)
        print(f"deadline {deadline_s:g} s reached: {done} of {len(exp.trials)} trials of {exp_id} finished, "
              f"{sum(len(t.intermediates) for t in exp.trials)} epochs reported; the experiment is stopped", flush=True)
    return exp, jobs, (time.time() - t0) / 60


def wait_experiment(port, budget=None, stall_s=600, until=None, poll_s=1):
    """Poll an experiment -> how the wait ended: DONE, ERROR or STOPPED (NNI's), BUDGET (the trials reported `budget`
    epochs), STALLED (no new epoch for stall_s seconds) or DEADLINE (time.monotonic() passed `until`)."""
    seen, since = -1, time.monotonic()
    while True:
        time.sleep(poll_s)
        status = nni_io.rest(port, "check-status")["status"]
        epochs = sum(m.get("type") == "PERIODICAL" for m in nni_io.rest(port, "metric-data"))
        if status in ("DONE", "ERROR", "STOPPED"):
            return status
        if budget and epochs >= budget:
            return "BUDGET"
        if until is not None and time.monotonic() >= until:
            return "DEADLINE"
        seen, since = (epochs, time.monotonic()) if epochs != seen else (seen, since)
        if time.monotonic() - since > stall_s:  # a dead dispatcher leaves the experiment RUNNING with nothing to run
            return "STALLED"


def train_run(cmd, run_dir):
    """Run a standalone train.py command into run_dir (or the next free name beside it, as train.py picks)
    -> (run dir, its (val accuracy, val F1) per epoch)."""
    run_dir = increment_path(run_dir)
    proc = subprocess.run([*cmd, "--model_dir", str(run_dir.parent), "--name", run_dir.name], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"train.py failed: {proc.stderr.strip()}")
    read_summary(run_dir)  # the run finished, there
    with open(run_dir / HISTORY, newline="") as f:
        rows = [(float(r["val_accuracy"]), float(r["val_f1"])) for r in csv.DictReader(f)]
    return run_dir, rows


# name -> (people, eval people, image size, seed): None = the demo itself
SETS = {"demo": None, "small": (120, 60, (112, 84), 31), "large": (700, 100, (144, 108), 32)}
MORE_SETS = {"mid": (250, 80, (160, 120), 33)}  # between small and the demo: drawn for bench/levers.py, not the searches' sets


def data_of(name, work):
    """The named set's folder (drawn into work on first use; the demo's own folder for demo)."""
    drawn = {**SETS, **MORE_SETS}[name]
    if drawn is None:
        return demo.ensure_demo_data()
    people, eval_people, size, seed = drawn
    root = work / "data" / name
    if not (root / "train").is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        demo.make_demo_data(root, people, eval_people, size=size, seed=seed)
    return root


def data_flags(data):
    return ["--data_dir", str(data / "train"), "--eval_dir", str(data / "eval")]


def table_f1(table, truth):
    """Macro F1 of soft votes (ImageID index, a column per class) against truth.csv."""
    labels = pd.read_csv(truth).set_index("ImageID").loc[table.index, "ans"].to_numpy()
    return score(labels, table.to_numpy().argmax(1), table.shape[1])["f1"]


def soft_f1(path, truth):
    """Macro F1 of a submission_soft.csv-like file against truth.csv."""
    return table_f1(pd.read_csv(path).set_index("ImageID"), truth)


def finalist_eval_f1(run_dir, name, k, truth):
    """Macro F1 of one finalist's K fold models, soft-voted on the eval split."""
    folds = [pd.read_csv(run_dir / name / f"fold{i}" / SUBMISSION_SOFT).set_index("ImageID") for i in range(k)]
    return table_f1(sum(folds) / k, truth)


def trial_time(folder):
    """Where one run's wall time went: start-up figures, first and later epochs, and its trial efficiency."""
    summary = read_summary(folder)
    with open(folder / HISTORY) as f:
        seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return dict(summary["startup"], wall_s=summary["wall_s"], first_epoch_s=seconds[0], later_epoch_s=steady,
                efficiency=len(seconds) * steady / summary["wall_s"])
