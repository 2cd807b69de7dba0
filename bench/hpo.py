"""Does the search pay? Real `nnictl` experiments on the demo data, at equal budgets in trial-epochs.

    python bench/hpo.py study                  # 3 seeds x 7 methods, about 90 minutes on 2 cores
    python bench/hpo.py study --seeds 1 --methods random hyperband --budget 60 --work /tmp/hpo
    python bench/hpo.py efficiency             # one local trial: training epochs / trial wall time
    python bench/hpo.py efficiency --trial_epochs 39   # the same for a trial as long as `python train.py`
    python bench/hpo.py study --trial_epochs 13 --work /tmp/hpo13    # searches whose trials train 13 epochs

study: every search runs config_local.yml's search space with trials of its trialCommand's --epochs
(20, or --trial_epochs; Hyperband's longest trial) one at a time, and is stopped when its trials
have trained --budget epochs in all (default: config_local's 12 trials x their epochs, 240):
  default    no search: `python train.py` with its defaults (1000 steps: 39 epochs), one run per seed
  default_trial  the same defaults trained as long as a search trial (config_local's --epochs)
  random     NNI's Random tuner
  tpe        config_local.yml's tuner and assessor: TPE (its n_startup_jobs, the defaults first) + Medianstop
  tpe_plain  the same without start_from_defaults: the first trials are random draws
  hyperband  NNI's Hyperband (search.nni_tuner.SafeHyperband), R = a trial's epochs, eta 3 (TRIAL_BUDGET = epochs, see train.py)
  tpe_f1     tpe_plain whose trials pick and report by macro F1 (--metric f1) instead of accuracy
  tpe_reshuffle  tpe whose trials each validate on their own people (--reshuffle_val, Nagler et al. 2024):
             does the winner of comparisons on different splits generalise better than on one?
Every run uses --resize 64 48 (a quarter of the default pixels) so that the 15 experiments
and 6 default runs fit in about 90 minutes on 2 cores. The best trial of each experiment (by
its objective, validation accuracy or for tpe_f1 macro F1, within the budget) predicts the demo's eval split from its best.pth, scored against eval/truth.csv; then its
configuration is trained again as long as the defaults (their 1000 steps) and scored the same way,
which compares the configuration the search found with the default one at equal training.
Each (method, seed) lands in --work/runs/ as JSON, so a rerun skips what is done; then
hpo.csv (best-so-far curves), hpo.png and the table are written from all of them.

efficiency: one local NNI trial of config_local.yml's trialCommand at the default size:
the seconds history.csv gives to training epochs over the trial's wall time from NNI's
start and end times.
Not a test: figures depend on the machine and its load.
"""
import argparse
import csv
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.scoring import evaluate
from bench.searches import ROOT, SIZE, default_budget, local_config, run_experiment, search_config, train_run, trial_words
from core import demo
from core.cli import Parser, run_main
from core.runs import BEST, HISTORY, SUBMISSION, read_summary
from search.trials import best_command

METHODS = ["default", "default_trial", "random", "tpe", "tpe_plain", "hyperband", "tpe_f1", "tpe_reshuffle"]


def build_parser():
    p = Parser(prog="hpo.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("study", choices=["study", "efficiency"], help="what to measure")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, help="methods to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="tuner and training seeds")
    p.add_argument("--budget", type=int, default=None, help="trial-epochs per search (default: config_local's trials x their epochs)")
    p.add_argument("--trial_epochs", type=int, default=None, help="a trial's epochs, in place of config_local's --epochs")
    p.add_argument("--port", type=int, default=8091, help="port of the experiments (one at a time)")
    p.add_argument("--work", type=Path, default=None, help="where experiments and results go (default: a temp dir)")
    return p


def eval_f1(checkpoint, out_dir, work, eval_dir):
    """The eval split's macro F1 of one checkpoint (baseline/inference.py, then evaluation)."""
    subprocess.run([sys.executable, str(ROOT / "baseline" / "inference.py"), "--checkpoint", str(checkpoint),
                    "--eval_dir", str(eval_dir), "--out", str(out_dir), "--cache_dir", str(work / "cache")],
                   check=True, capture_output=True, text=True)
    return evaluate(out_dir / SUBMISSION, eval_dir / "truth.csv", "mask")["scores"]["f1"]


# ----------------------------------------------------------------------------- the study
def search_run(method, seed, base, work, cli, eval_dir):
    """The best trial is the best within the budget; its best.pth may hold an epoch or two trained after the
    budget ran out (the experiment is stopped within a few seconds of the last counted epoch)."""
    config = search_config(method, seed, base, work)
    exp, _, minutes = run_experiment(config, cli.port, work, cli.budget)
    rows, best = [], None  # every reported epoch in the order trained (one trial at a time), cut at the budget
    for t in sorted(exp.trials, key=lambda t: t.sequence):
        for m in t.intermediates:
            if len(rows) < cli.budget:
                rows.append((m["accuracy"], m["f1"]))
                if best is None or m["default"] > best[0]:
                    best = (m["default"], t)
    if best is None:
        sys.exit(f"{method} seed {seed}: no trial reported a metric")
    trial = best[1]
    command = best_command(config["trialCommand"], trial.params)
    return dict(method=method, seed=seed, curve=rows, trials=len({t.id for t in exp.trials if t.intermediates}), minutes=minutes,
                eval_f1=eval_f1(Path(trial.log_path) / BEST, work / "eval" / f"{method}_{seed}", work, eval_dir),
                best_trial=trial.id, command=command)


def train_and_score(cmd, run_dir, eval_dir):
    """Run a standalone train.py command into run_dir (or the next free name beside it, as train.py picks)
    -> (run dir, its (val accuracy, val F1) per epoch, eval-split macro F1)."""
    run_dir, rows = train_run(cmd, run_dir)
    return run_dir, rows, evaluate(run_dir / SUBMISSION, eval_dir / "truth.csv", "mask")["scores"]["f1"]


def default_run(method, seed, base, work, cli, eval_dir):
    """No search: train.py's defaults, at their own length (default) or at a search trial's (default_trial)."""
    t0 = time.time()
    words = trial_words(base) if method == "default_trial" else [sys.executable, "train.py"]
    cmd = [words[0], str(ROOT / "train.py"), *words[2:], *SIZE, "--seed", str(seed), "--cache_dir", str(work / "cache")]
    run_dir, rows, f1 = train_and_score(cmd, work / "default_runs" / f"{method}{seed}", eval_dir)
    return dict(method=method, seed=seed, curve=rows, trials=1, minutes=(time.time() - t0) / 60, eval_f1=f1,
                best_trial=str(run_dir), command=shlex.join(["python3", "train.py", *cmd[2:]]))


def retrain(result, work, eval_dir):
    """The search's best configuration trained as long as the defaults (their 1000 steps, not a trial's --epochs)
    -> its eval-split macro F1: the configuration against the default one at equal training."""
    words = shlex.split(result["command"])
    keep = [w for i, w in enumerate(words) if w != "--epochs" and (i == 0 or words[i - 1] != "--epochs")]
    cmd = [keep[0], str(ROOT / "train.py"), *keep[2:]]
    return train_and_score(cmd, work / "retrained" / f"{result['method']}{result['seed']}", eval_dir)[2]


def best_so_far(curve, column):
    return np.maximum.accumulate([row[column] for row in curve])


def summarise(results):
    """-> table rows per method: mean/sd of the final bests and eval F1, and the trial-epochs its mean
    best-so-far curve needed to reach Random's mean final best."""
    by_method = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    target = None
    if "random" in by_method:
        target = np.mean([best_so_far(r["curve"], 0)[-1] for r in by_method["random"]])
    table = []
    for method in METHODS:
        runs = by_method.get(method)
        if not runs:
            continue
        n = min(len(r["curve"]) for r in runs)
        mean_curve = np.mean([best_so_far(r["curve"], 0)[:n] for r in runs], axis=0)
        reach = int(np.argmax(mean_curve >= target - 1e-12)) + 1 if target is not None and mean_curve.max() >= target - 1e-12 else None
        stats = lambda values: (float(np.mean(values)), float(np.std(values)))  # noqa: E731
        table.append(dict(method=method, seeds=len(runs), epochs=n, trials=stats([r["trials"] for r in runs]),
                          val_accuracy=stats([best_so_far(r["curve"], 0)[-1] for r in runs]),
                          val_f1=stats([best_so_far(r["curve"], 1)[-1] for r in runs]),
                          eval_f1=stats([r["eval_f1"] for r in runs]), reach=reach,
                          retrained_f1=None if method.startswith("default") else stats([r["retrained_eval_f1"] for r in runs]),
                          minutes=stats([r["minutes"] for r in runs])))
    return table, target


def print_table(table, target, budget):
    print(f"\nbudget {budget} trial-epochs; Random's mean final best val accuracy {target if target is None else round(target, 4)}")
    print(f"{'method':<13} {'seeds':>5} {'trials':>7} {'val acc':>15} {'val F1':>15} {'eval F1':>15} {'retrained':>15} "
          f"{'reach':>6} {'minutes':>8}")
    pm = lambda s: f"{s[0]:.4f}±{s[1]:.4f}"  # noqa: E731
    for row in table:
        print(f"{row['method']:<13} {row['seeds']:>5} {row['trials'][0]:>7.1f} {pm(row['val_accuracy']):>15} {pm(row['val_f1']):>15} "
              f"{pm(row['eval_f1']):>15} {pm(row['retrained_f1']) if row['retrained_f1'] else '-':>15} {row['reach'] if row['reach'] else '-':>6} {row['minutes'][0]:>8.1f}")
    print("retrained: eval F1 of the best configuration trained as long as the defaults (1000 steps)")
    print("reach: trial-epochs the method's mean best-so-far curve needed to reach Random's mean final best")


def plot(results, budget, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for column, (ax, name) in enumerate(zip(axes, ["accuracy", "macro F1"])):
        for method in METHODS:
            runs = [r for r in results if r["method"] == method]
            if not runs:
                continue
            n = min(len(r["curve"]) for r in runs)
            curves = np.array([best_so_far(r["curve"], column)[:n] for r in runs])
            x = np.arange(1, n + 1)
            line, = ax.plot(x, curves.mean(0), label=f"{method} (mean of {len(runs)})", drawstyle="steps-post")
            ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15, step="post")
            if method.startswith("default"):  # one run of n epochs: its final best, carried across for comparison
                ax.hlines(curves.mean(0)[-1], n, budget, colors=line.get_color(), linestyles=":")
        lo = min(best_so_far(r["curve"], column)[-1] for r in results) - 0.15  # the end game, where methods differ
        ax.set(xlabel="trial-epochs spent", ylabel=f"best validation {name} so far", xlim=(0, budget), ylim=(lo, 1.0))
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right")
    fig.suptitle("Search vs default on the demo data (64x48; line: mean, band: min-max over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_curves(results, path):
    with open(path, "w") as f:
        f.write("method,seed,trial_epoch,val_accuracy,val_f1,best_val_accuracy,best_val_f1\n")
        for r in results:
            acc, f1 = best_so_far(r["curve"], 0), best_so_far(r["curve"], 1)
            for i, (a, b) in enumerate(r["curve"]):
                f.write(f"{r['method']},{r['seed']},{i + 1},{a:.6f},{b:.6f},{acc[i]:.6f},{f1[i]:.6f}\n")


def study(cli, work):
    base = local_config(cli.trial_epochs)
    cli.budget = default_budget(base) if cli.budget is None else cli.budget
    eval_dir = demo.ensure_demo_data() / "eval"
    (work / "runs").mkdir(parents=True, exist_ok=True)
    for seed in cli.seeds:
        for method in cli.methods:
            done = work / "runs" / f"{method}_{seed}.json"
            if done.is_file():
                continue
            print(f"{time.strftime('%H:%M:%S')} {method} seed {seed} ...", flush=True)
            run = default_run if method.startswith("default") else search_run
            result = run(method, seed, base, work, cli, eval_dir)
            done.write_text(json.dumps(result))
            print(f"  best val accuracy {best_so_far(result['curve'], 0)[-1]:.4f} in {len(result['curve'])} epochs, "
                  f"{result['trials']} trials, eval F1 {result['eval_f1']:.4f}, {result['minutes']:.1f} min", flush=True)
    results = []
    for path in sorted((work / "runs").glob("*.json")):
        result = json.loads(path.read_text())
        if not result["method"].startswith("default") and "retrained_eval_f1" not in result:
            print(f"{time.strftime('%H:%M:%S')} retraining {result['method']} seed {result['seed']}'s best at the default length ...", flush=True)
            result["retrained_eval_f1"] = retrain(result, work, eval_dir)
            path.write_text(json.dumps(result))
        results.append(result)
    table, target = summarise(results)
    print_table(table, target, cli.budget)
    write_curves(results, work / "hpo.csv")
    plot(results, cli.budget, work / "hpo.png")
    best = max((r for r in results if not r["method"].startswith("default")), key=lambda r: best_so_far(r["curve"], 0)[-1], default=None)
    if best:
        print(f"best trial overall ({best['method']} seed {best['seed']}): {best['command']}")
    print(f"wrote {work / 'hpo.csv'} and {work / 'hpo.png'}")


# ----------------------------------------------------------------------------- trial efficiency
def efficiency(cli, work):
    base = local_config(cli.trial_epochs)
    config = dict(experimentName="hpo-efficiency", searchSpace={"lr": {"_type": "choice", "_value": [2e-3]}},
                  trialCommand=shlex.join(trial_words(base)),
                  trialCodeDirectory=str(ROOT), trialConcurrency=1, maxTrialNumber=1,
                  experimentWorkingDirectory=str(work / "nni"), trainingService=base["trainingService"], tuner=dict(name="GridSearch"))
    _, jobs, _ = run_experiment(config, cli.port, work)
    job, out = jobs[0], Path(jobs[0]["logPath"])
    with open(out / HISTORY, newline="") as f:
        training = sum(float(r["seconds"]) for r in csv.DictReader(f))
    wall = (job["endTime"] - job["startTime"]) / 1000
    first_step = read_summary(out)["first_step_s"]
    after = job["endTime"] / 1000 - (out / HISTORY).stat().st_mtime  # figures, eval prediction, exit
    print(f"trial {job['trialJobId']} ({job['status']}): {wall:.1f} s wall, {training:.1f} s in training epochs: "
          f"efficiency {training / wall:.3f}\n  start-up to the first step {first_step:.1f} s, after the last epoch {after:.1f} s, "
          f"the rest (NNI's launch, checkpoints between epochs) {wall - training - first_step - after:.1f} s")


def main(argv=None):
    cli = build_parser().parse_args(argv)
    work = cli.work or Path(tempfile.mkdtemp(prefix="hpo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    study(cli, work) if cli.study == "study" else efficiency(cli, work)


def cli(argv=None):
    return run_main("hpo.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
