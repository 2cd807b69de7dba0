"""From a search to a submission you can trust: the best few configurations re-ranked on every fold,
trained on the search's own machines, their models brought home, the winner's folds voted.

    python baseline/finalize.py --id EXP_ID --config config_local.yml        # a finished or running search
    python baseline/finalize.py --port 8080 --config config_remote.yml --top 3 --k 5
    python baseline/finalize.py --id EXP_ID --config config_local.yml --select greedy

1. finalists  the top --top distinct configurations by the search's objective (a trial's length,
              --epochs or TRIAL_BUDGET, is not part of a configuration), plus the trial command's own
              flags (train.py's defaults where the search space is all it changes) when they are not
              among them, so the selection can never end below the defaults
2. folds      every finalist trained on the K person-grouped folds (--kfold K --fold i) at the length a
              standalone run trains (--epochs 0: --steps), as one NNI experiment (BatchTuner, one trial per
              finalist and fold) on --config's training service: this machine, or the same machineList
3. home       each fold trial's config.json, summary.json, best.pth, history.csv, val_soft.csv (its
              held-out people) and submission_soft.csv (the eval dir) copied into runs/finalize_<EXP_ID>/
              <finalist>/fold<i>/ (over SSH with the config's user, port and key for remote trials),
              each file checked before the folder is put in place; a second run trains no fold twice
4. rank       each finalist's out-of-fold macro F1 (the K held-out parts cover the training set once),
              its spread over folds, beside its single-split validation metric from the search
5. vote       --select winner: the best finalist by out-of-fold F1, its K fold models soft-voted on
              the eval dir; --select greedy: greedy ensemble selection with replacement over all the
              finalists' out-of-fold probabilities (Caruana et al. 2004), its weights applied to their
              eval votes. -> submission.csv, submission_soft.csv, finalize.json and report.md
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from baseline import experiment as expmod  # noqa: E402
from baseline.preflight import is_remote, machines_of, train_words  # noqa: E402
from core.cli import Parser, run_main  # noqa: E402
from core.metrics import score  # noqa: E402
from core.files import replace_atomically  # noqa: E402
from core.runs import read_summary, write_submission  # noqa: E402
from core.submissions import alignment, read_soft, read_val_soft  # noqa: E402
from training import checkpoint, flags  # noqa: E402
from training.signals import STOP  # noqa: E402

FETCHED = ("config.json", "summary.json", "best.pth", "history.csv", "val_soft.csv", "submission_soft.csv")
NOT_CONFIGURATION = ("epochs", "kfold", "fold")  # a run's length and its fold say how, not what, it trains


@dataclass
class Finalist:
    name: str            # "top1", "top2", ... by rank, or "defaults" (the trial command's own flags)
    params: dict         # flat train.py flags over the trial command ({} for the defaults)
    trial: str = ""      # the search trial it comes from
    search_metric: float = None  # that trial's validation metric (the search's objective, one split)
    config: dict = None  # the resolved train.py flags its folds train with (config.json less its length and fold)


# ----------------------------------------------------------------------------- finalists
def configuration(trial_command, params):
    """The flags a run trains with, without its length and fold: two trials with the same one are one finalist."""
    words = train_words(trial_command) + expmod.flag_words(params)
    resolved = flags.run_config(flags.resolve(flags.build_parser().parse_args(words)))
    return json.loads(json.dumps({k: v for k, v in resolved.items() if k not in NOT_CONFIGURATION}))  # as config.json reads


def ran_configuration(folder):
    """What a fold run trained with, from its own config.json, in configuration()'s terms."""
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in NOT_CONFIGURATION}


def differences(old, new):
    """Two configurations -> 'flag old -> new' for each flag that differs, for a one-line message."""
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return ", ".join(f"--{k} {old.get(k)} -> {new.get(k)}" for k in keys[:3]) + (", ..." if len(keys) > 3 else "")


def finished(exp):
    """The search's trials that reported a final result: only those rank configurations."""
    return [t for t in exp.trials if expmod._is_number(t.metric)]


def select_finalists(exp, trial_command, top=3, defaults_only=False):
    """The top distinct configurations by the search's objective, then the trial command's own (the defaults).
    A search with no finished trial is refused (it would be finalized as the defaults alone) unless defaults_only."""
    defaults = configuration(trial_command, {})
    if defaults_only:
        return [Finalist("defaults", {}, config=defaults)]
    if not finished(exp):
        raise ValueError(f"nothing to finalize yet: experiment {exp.id} has {len(exp.trials)} trials, none reported a final "
                         f"result (wait for the search, or pass --defaults_only to finalize train.py's defaults alone)")
    finalists = []
    for trial in expmod.ranked(exp):
        value = trial.metric if expmod._is_number(trial.metric) else trial.best_intermediate_for(exp.maximize)
        if value is None or len(finalists) == top:
            continue
        params = {k: v for k, v in expmod.flatten(trial.params).items() if k not in NOT_CONFIGURATION}
        config = configuration(trial_command, params)
        if config not in [f.config for f in finalists]:
            name = "defaults" if config == defaults else f"top{len(finalists) + 1}"  # e.g. SafeTPE's first trial
            finalists.append(Finalist(name, params, trial.id, value, config))
    if all(f.config != defaults for f in finalists):
        finalists.append(Finalist("defaults", {}, config=defaults))
    return finalists


def fold_jobs(finalists, k, done):
    """BatchTuner's parameter sets: every (finalist, fold) not yet home, trained at the standalone length."""
    return [dict(f.params, epochs=0, kfold=k, fold=fold) for f in finalists for fold in range(k) if (f.name, fold) not in done]


# ----------------------------------------------------------------------------- the NNI experiment
def read_config(path):
    """The search's NNI config (YAML, read safely) -> dict; one line naming the file otherwise."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = getattr(e, "strerror", None) or getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"--config {path}: not a readable YAML file ({reason})") from None
    if not isinstance(config, dict) or "trialCommand" not in config:
        raise ValueError(f"--config {path}: not an NNI experiment config (no trialCommand)")
    return config


def fold_experiment_config(config_path, exp_id, jobs):
    """The search's own config (training service, machines, trial command, concurrency) with BatchTuner over the jobs."""
    config_path = Path(config_path)
    config = read_config(config_path)
    for key in ("searchSpace", "searchSpaceFile", "assessor", "advisor", "maxExperimentDuration", "maxTrialDuration"):
        config.pop(key, None)
    code = Path(config.get("trialCodeDirectory", "."))
    config.update(experimentName=f"finalize-{exp_id}", trialCodeDirectory=str(code if code.is_absolute() else config_path.parent.resolve() / code),
                  searchSpace={"combine_params": {"_type": "choice", "_value": jobs}}, tuner={"name": "BatchTuner"},
                  maxTrialNumber=len(jobs))
    return config


def nnictl(*args, timeout=180):
    binary = Path(sys.executable).parent / "nnictl"
    proc = subprocess.run([str(binary if binary.exists() else "nnictl"), *args], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def run_fold_experiment(config, run_dir, port, log=print):
    """nnictl create, wait until every fold trial has ended, read the trials back, nnictl stop -> (trials, how it
    ended: DONE, ERROR, STOPPED, or INTERRUPTED by SIGINT/SIGTERM here). The experiment is stopped on every way out,
    so an interrupted finalize leaves no manager holding the port."""
    path = run_dir / "folds.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    created = exp_id = None
    try:
        with STOP.deferred():  # a signal during the start waits for its id, so the experiment can be stopped
            code, out = nnictl("create", "--config", str(path), "--port", str(port))
            if code:
                raise ValueError(f"nnictl create --config {path} failed: {' '.join(out.split())[-300:]}")
            created, exp_id = True, exp_id_of(out)
        log(f"fold experiment on port {port} (web UI http://127.0.0.1:{port}): {config['maxTrialNumber']} trials")
        try:
            while (status := expmod._get(f"http://127.0.0.1:{port}", "check-status", 10)["status"]) not in ("DONE", "ERROR", "STOPPED"):
                time.sleep(3)
        except KeyboardInterrupt:
            status = "INTERRUPTED"
        with STOP.deferred():  # a second signal waits until the trials are read
            trials = fold_trials(port, exp_id)
    finally:
        if created:  # stopped on every way out: no manager is left holding the port
            with STOP.deferred():
                nnictl("stop", exp_id) if exp_id else nnictl("stop", "--port", str(port))
    return trials, status


def fold_trials(port, exp_id):
    """The fold experiment's trials: from its manager, or from its database where the manager is gone."""
    try:
        return expmod.from_rest(port).trials
    except (urllib.error.URLError, OSError, KeyError):
        return expmod.from_id(exp_id).trials if exp_id else []


def exp_id_of(nnictl_output):
    found = re.search(r"Experiment ID: (\w+)", re.sub(r"\x1b\[[0-9;]*m", "", nnictl_output))
    return found.group(1) if found else None


# ----------------------------------------------------------------------------- bringing the models home
def check_fetched(folder):
    """Every copied file is what a finished fold run writes; ValueError naming the first that is not."""
    summary = read_summary(folder)
    checkpoint.read_meta(folder / "best.pth")
    for name in ("val_soft.csv", "submission_soft.csv", "history.csv"):
        try:
            table = pd.read_csv(folder / name)
        except Exception as e:  # pandas' parser errors: the file, not our code
            raise ValueError(f"{folder / name}: not a CSV ({type(e).__name__})") from None
        if table.empty or (name != "history.csv" and "ImageID" not in table):
            raise ValueError(f"{folder / name}: empty or without ImageID")
    return summary


def bring_home(trial, finalists, trial_command, run_dir, machines):
    """One fold trial's files -> run_dir/<finalist>/fold<i>/, put in place only when all are there and check out.
    Which finalist and fold it ran is read from its own config.json (NNI 3.0 can list another's parameters)."""
    tmp = run_dir / f".fetch-{trial.id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        expmod.fetch(trial.log_path, tmp, machines, FETCHED)
        config = json.loads((tmp / "config.json").read_text())
        ran = {k: v for k, v in config.items() if k not in NOT_CONFIGURATION}
        finalist = next((f for f in finalists if configuration(trial_command, f.params) == ran), None)
        if finalist is None:
            raise ValueError(f"trial {trial.id}: its config.json matches no finalist")
        check_fetched(tmp)
        target = run_dir / finalist.name / f"fold{config['fold']}"
        target.parent.mkdir(exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        return finalist.name, config["fold"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def folds_home(run_dir, finalists, k):
    """(finalist, fold) pairs whose files are home (their folder exists only once every file checked out)."""
    return {(f.name, fold) for f in finalists for fold in range(k) if (run_dir / f.name / f"fold{fold}" / "summary.json").is_file()}


# ----------------------------------------------------------------------------- ranking and voting
def fold_files(folder, finalist):
    """A fold at home -> (its summary, val_soft.csv, submission_soft.csv), each checked: present, readable, and
    trained with the finalist's planned command (a fold of another command is never voted)."""
    for name in ("summary.json", "config.json", "val_soft.csv", "submission_soft.csv"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder / name}: missing (delete {folder} and run finalize again to retrain that fold)")
    ran = ran_configuration(folder)
    if finalist.config is not None and ran != finalist.config:
        raise ValueError(f"{folder}: trained with another command than {finalist.name}'s plan ({differences(finalist.config, ran)}); "
                         f"delete it and run again, or use another --out")
    return read_summary(folder), read_val_soft(folder / "val_soft.csv"), read_soft(folder / "submission_soft.csv")


def finalist_scores(run_dir, finalist, k):
    """-> dict(oof probs (sorted ImageID order), labels, ids, classes, fold F1s, eval ids, eval probs (mean of the folds)).
    The K held-out parts must cover the training images exactly once: a short val_soft.csv would score fewer."""
    parts, evals, fold_f1, seen = [], [], [], {}
    for fold in range(k):
        folder = run_dir / finalist.name / f"fold{fold}"
        summary, (ids, labels, probs, classes), (eval_ids, eval_probs, eval_classes) = fold_files(folder, finalist)
        if len(ids) != summary["val_images"]:
            raise ValueError(f"{folder / 'val_soft.csv'}: {len(ids)} held-out images, its run held out {summary['val_images']} "
                             f"(damaged? delete {folder} and run again to retrain it)")
        again = next((i for i in ids if i in seen), None)
        if again is not None:
            raise ValueError(f"{folder / 'val_soft.csv'}: {again} is held out in fold{seen[again]} too (not one K-fold split?)")
        if (parts and classes != parts[0][3]) or eval_classes != classes:
            raise ValueError(f"{folder}: its val_soft.csv and submission_soft.csv name other classes than {finalist.name}'s fold0")
        seen.update(dict.fromkeys(ids, fold))
        fold_f1.append(score(labels, probs.argmax(1), len(classes))["f1"])
        parts.append((ids, labels, probs, classes))
        if evals:  # the same eval images, in fold0's order
            eval_probs = eval_probs[alignment(evals[0][0], eval_ids, folder / "submission_soft.csv", run_dir / finalist.name / "fold0")]
        evals.append((eval_ids if not evals else evals[0][0], eval_probs))
    total = summary["train_images"] + summary["val_images"]
    if len(seen) != total:
        raise ValueError(f"{finalist.name}: its {k} held-out parts cover {len(seen)} of the {total} training images "
                         f"(not one K-fold split of the same data?)")
    ids = [i for p in parts for i in p[0]]
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return dict(ids=[ids[i] for i in order], labels=np.concatenate([p[1] for p in parts])[order],
                probs=np.concatenate([p[2] for p in parts])[order], classes=parts[0][3], fold_f1=fold_f1,
                eval_ids=evals[0][0], eval_probs=np.mean([e[1] for e in evals], axis=0))


def macro_f1(labels, probs):
    return score(labels, probs.argmax(1), probs.shape[1])["f1"]


def greedy_selection(oofs, labels, rounds=None):
    """Ensemble selection with replacement (Caruana et al. 2004, as auto-sklearn does): add, round by round,
    the member whose addition gives the averaged out-of-fold probabilities the best macro F1; keep the best
    ensemble seen. -> (weights summing to 1, its out-of-fold macro F1)."""
    rounds = rounds or 5 * len(oofs)
    counts, total, best = np.zeros(len(oofs)), np.zeros_like(oofs[0], dtype=np.float64), (-math.inf, None)
    for r in range(rounds):
        trial = [macro_f1(labels, (total + o) / (r + 1)) for o in oofs]
        j = int(np.argmax(trial))  # ties go to the earlier member: the better-ranked finalist
        counts[j] += 1
        total += oofs[j]
        if trial[j] > best[0]:
            best = (trial[j], counts / counts.sum())
    return best[1], best[0]


def rank_and_vote(run_dir, finalists, k, select):
    """Score every finalist out of fold on the same images and labels, pick, vote -> the report dict."""
    results = {f.name: finalist_scores(run_dir, f, k) for f in finalists}
    first = results[finalists[0].name]
    for name, r in results.items():
        if r["ids"] != first["ids"] or r["classes"] != first["classes"] or r["eval_ids"] != first["eval_ids"]:
            raise ValueError(f"{name}: its folds cover other images or classes than {finalists[0].name}'s")
        if not np.array_equal(r["labels"], first["labels"]):
            raise ValueError(f"{name}: its held-out images carry other labels than {finalists[0].name}'s "
                             f"(other data?): out-of-fold scores would not compare")
    rows = [dict(asdict(f), oof_f1=macro_f1(first["labels"], results[f.name]["probs"]), fold_f1_mean=float(np.mean(results[f.name]["fold_f1"])),
                 fold_f1_sd=float(np.std(results[f.name]["fold_f1"], ddof=1)) if k > 1 else 0.0) for f in finalists]
    winner = max(rows, key=lambda row: row["oof_f1"])
    weights, greedy_f1 = greedy_selection([results[f.name]["probs"] for f in finalists], first["labels"])
    chosen = {"winner": {winner["name"]: 1.0}, "greedy": {f.name: float(w) for f, w in zip(finalists, weights) if w > 0}}
    eval_probs = sum(w * results[name]["eval_probs"] for name, w in chosen[select].items())
    write_submission(run_dir, first["eval_ids"], eval_probs, first["classes"])
    return dict(k=k, select=select, finalists=rows, winner=winner["name"], winner_oof_f1=winner["oof_f1"],
                greedy_weights=chosen["greedy"], greedy_oof_f1=greedy_f1, voted=chosen[select],
                oof_images=len(first["ids"]), eval_images=len(first["eval_ids"]))


def write_report(run_dir, report):
    replace_atomically(run_dir / "finalize.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    lines = [f"# finalize: experiment {report['experiment']}, {report['k']} folds", "",
             "| finalist | search trial | its val metric (one split) | out-of-fold macro F1 | fold F1 mean ± sd | flags |",
             "|---|---|---|---|---|---|"]
    for row in report["finalists"]:
        metric = "-" if row["search_metric"] is None else f"{row['search_metric']:.4f}"
        lines.append(f"| {row['name']} | {row['trial'] or '-'} | {metric} | {row['oof_f1']:.4f} | "
                     f"{row['fold_f1_mean']:.4f} ± {row['fold_f1_sd']:.4f} | `{' '.join(expmod.flag_words(row['params'])) or '(the trial command)'}` |")
    voted = ", ".join(f"{name} x {w:.2f}" for name, w in report["voted"].items())
    greedy = ", ".join(f"{name} x {w:.2f}" for name, w in report["greedy_weights"].items())
    lines += ["", f"Best by out-of-fold macro F1: **{report['winner']}** ({report['winner_oof_f1']:.4f}). Greedy ensemble "
              f"selection: {greedy} (out-of-fold {report['greedy_oof_f1']:.4f}, optimistic: chosen on the "
              f"same predictions).", f"Voted (--select {report['select']}): {voted}; the K fold models of each, soft-voted on "
              f"{report['eval_images']} eval images -> submission.csv, submission_soft.csv."]
    replace_atomically(run_dir / "report.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))


# ----------------------------------------------------------------------------- main
def build_parser():
    p = Parser(prog="finalize.py", description="Re-rank a search's best configurations on K folds, bring the fold models "
                                               "home and vote them into a submission.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--id", help="the search's experiment id (running, or stopped: read from its nni.sqlite)")
    g.add_argument("--port", type=int, help="port of the running search")
    p.add_argument("--config", required=True, help="the search's NNI config file: its training service runs the folds")
    p.add_argument("--top", type=int, default=3, help="distinct configurations to re-rank (the defaults join them)")
    p.add_argument("--k", type=int, default=5, help="folds")
    p.add_argument("--select", default="winner", choices=["winner", "greedy"],
                   help="the best finalist's folds, or greedy ensemble selection over every finalist")
    p.add_argument("--defaults_only", action="store_true",
                   help="finalize the trial command's own flags alone (for a search that has not reported a result)")
    p.add_argument("--out", default=None, help="run dir (default runs/finalize_<EXP_ID>; a rerun there trains only what is missing)")
    p.add_argument("--fold_port", type=int, default=8091, help="port of the fold experiment's NNI manager")
    return p


def load_search(args):
    try:
        return expmod.from_rest(args.port) if args.port else expmod.from_id(args.id)
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(f"no NNI experiment answers on port {args.port} ({e})") from None
    except LookupError as e:
        raise ValueError(str(e)) from None


@contextlib.contextmanager
def locked(run_dir):
    """One finalize at a time per run dir: two would train every fold twice and write over each other's results."""
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ValueError(f"{run_dir}: another finalize.py (pid {f.read().strip() or '?'}) is running there; "
                             f"wait for it or use another --out") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def plan(run_dir, args, exp, finalists, trial_command):
    """The finalists of the first run in run_dir, so a rerun re-trains and re-ranks the same ones. A rerun for
    another search, --top, --k, or with another trial command is refused: its folds would be voted with the old ones."""
    path = run_dir / "plan.json"
    fixed = dict(experiment=exp.id, top=args.top, k=args.k, defaults_only=args.defaults_only)
    if not path.is_file():
        replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(dict(fixed, finalists=[asdict(f) for f in finalists]), indent=2)))
        return finalists
    saved = json.loads(path.read_text())
    changed = [f"--{k} {saved.get(k)} (now {v})" if k != "experiment" else f"experiment {saved.get(k)} (now {v})"
               for k, v in fixed.items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"{run_dir} was planned for {', '.join(changed)}: use another --out")
    finalists = [Finalist(**f) for f in saved["finalists"]]
    for f in finalists:
        now = configuration(trial_command, f.params)
        if now != f.config:
            raise ValueError(f"{run_dir} was planned with another trial command: {f.name} {differences(f.config, now)}; "
                             f"use the config it was planned with, or another --out")
    return finalists


def train_missing(args, config, run_dir, finalists, exp_id):
    """The fold experiment over what is not home yet, then every finished fold brought home, also when it ended early."""
    jobs = fold_jobs(finalists, args.k, folds_home(run_dir, finalists, args.k))
    machines = machines_of(config) if is_remote(config) else []
    trials, status = run_fold_experiment(fold_experiment_config(args.config, exp_id, jobs), run_dir, args.fold_port)
    with STOP.deferred():  # each fold comes home whole or not at all
        for trial in (t for t in trials if t.status == "SUCCEEDED"):
            print(f"home: {bring_home(trial, finalists, config['trialCommand'], run_dir, machines)} from {trial.log_path}", flush=True)
    missing = fold_jobs(finalists, args.k, folds_home(run_dir, finalists, args.k))
    if status == "INTERRUPTED":
        raise KeyboardInterrupt(f"{len(jobs) - len(missing)} of the {len(jobs)} fold trainings came home to {run_dir}, "
                                f"the fold experiment is stopped; run finalize again to train only the other {len(missing)}")
    if missing:
        raise ValueError(f"{len(missing)} fold trainings did not come home (the fold experiment ended {status}; their "
                         f"trials' trial.stderr say why); run finalize again to train only those")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.k < 2 or args.top < 1:
        raise ValueError(f"--k {args.k} --top {args.top}: need K >= 2 and at least one finalist")
    config = read_config(args.config)
    exp = load_search(args)
    run_dir = Path(args.out or Path("runs") / f"finalize_{exp.id}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked(run_dir):
        finalists = plan(run_dir, args, exp, select_finalists(exp, config["trialCommand"], args.top, args.defaults_only),
                         config["trialCommand"])
        if len(finalists) == 1 and not args.defaults_only:
            print(f"warning: every finalist is the defaults: the search's {len(exp.trials)} trials "
                  f"({len(finished(exp))} finished) found no other configuration", file=sys.stderr, flush=True)
        print(f"{len(finalists)} finalists: {', '.join(f.name for f in finalists)}; {args.k} folds each -> {run_dir}", flush=True)
        if fold_jobs(finalists, args.k, folds_home(run_dir, finalists, args.k)):
            train_missing(args, config, run_dir, finalists, exp.id)
        else:
            print(f"all {len(finalists) * args.k} fold trainings are home: training nothing", flush=True)
        report = dict(experiment=exp.id, **rank_and_vote(run_dir, finalists, args.k, args.select))
        write_report(run_dir, report)
    print((run_dir / "report.md").read_text(), flush=True)
    return run_dir, report


def cli(argv=None):
    STOP.install()  # SIGTERM as SIGINT: both stop the fold experiment and keep the folds that finished
    try:
        return run_main("finalize.py", main, argv)
    except KeyboardInterrupt as e:
        why = e.args[0] if e.args and isinstance(e.args[0], str) else "nothing was half-written; run it again to go on"
        print(f"finalize.py: interrupted: {why}", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
