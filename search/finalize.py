"""From a search to a submission you can trust: the best few configurations re-ranked on every fold,
trained on the search's own machines, their models brought home, the winner's folds voted.

    python search/finalize.py --id EXP_ID --config config_local.yml        # a finished or running search
    python search/finalize.py --port 8080 --config config_remote.yml --top 3 --k 5
    python search/finalize.py --id EXP_ID --config config_local.yml --select greedy
    python search/finalize.py --id EXP_ID --config config_local.yml --select soup
    python search/finalize.py --id EXP_ID --config config_gpu.yml --deadline 8     # stop the folds at 8 min; a rerun goes on

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
              eval votes; --select soup: per fold, a greedy model soup (Wortsman et al. 2022) of the
              finalists that share the winner's backbone and input size, its K soups soft-voted (one
              model per fold at inference). -> submission.csv, submission_soft.csv, finalize.json, report.md
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import time
import urllib.error
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import yaml

from core.cli import Parser, UserError, run_main
from core.files import DiskFull, replace_atomically
from core.runs import (BEST, CONFIG, FOLD_EXPERIMENTS, FOLDS_CONFIG, HISTORY, REPORT, RETRY_OF, SUBMISSION_SOFT, SUMMARY, VAL_SOFT,
                       read_summary)
from core.signals import STOP
from search import nni_io
from search.finalists import Finalist, configuration, differences, finished, fold_jobs, ran_configuration, select_finalists
from search.trials import from_id, from_rest
from search.vote import rank_and_vote, write_report
from training import checkpoint

FETCHED = (CONFIG, SUMMARY, BEST, HISTORY, VAL_SOFT, SUBMISSION_SOFT)


# ----------------------------------------------------------------------------- the NNI experiment
def read_config(path):
    """The search's NNI config -> dict; one line naming the file otherwise."""
    try:
        return nni_io.load_config(path)
    except ValueError as e:
        raise UserError(f"--config {e}") from None


def fold_experiment_config(config_path, exp_id, jobs, deadline=None):
    """The search's own config (training service, machines, trial command, concurrency) with BatchTuner over the jobs.
    Its maxExperimentDuration is the deadline's (minutes), else none: the search's own budget is no measure of K folds
    of several finalists at the standalone length (config_local's 30 minutes against their 45)."""
    config_path = Path(config_path)
    config = read_config(config_path)
    duration = f"{math.ceil(deadline * 60)}s" if deadline else None
    for key in ("searchSpace", "searchSpaceFile", "assessor", "advisor", "maxExperimentDuration", "maxTrialDuration"):
        config.pop(key, None)
    if duration:
        config["maxExperimentDuration"] = duration
    code = Path(config.get("trialCodeDirectory", "."))
    config.update(experimentName=f"finalize-{exp_id}", trialCodeDirectory=str(code if code.is_absolute() else config_path.parent.resolve() / code),
                  searchSpace={"combine_params": {"_type": "choice", "_value": jobs}}, tuner={"name": "BatchTuner"},
                  maxTrialNumber=len(jobs))
    return config


def run_fold_experiment(config, run_dir, port, log=print, deadline_s=None):
    """nnictl create, wait until every fold trial has ended or deadline_s (counted from before the create) has passed,
    read the trials back, nnictl stop -> (trials, how it ended: DONE, ERROR, STOPPED, DEADLINE, or INTERRUPTED by
    SIGINT/SIGTERM here). The experiment is stopped on every way out, so an interrupted finalize leaves no manager
    holding the port."""
    path = run_dir / FOLDS_CONFIG
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    created = exp_id = None
    until = None if deadline_s is None else time.monotonic() + deadline_s
    try:
        with STOP.deferred():  # a signal during the start waits for its id, so the experiment can be stopped
            code, out = nni_io.nnictl("create", "--config", str(path), "--port", str(port))
            if code:
                raise UserError(f"nnictl create --config {path} failed: {' '.join(out.split())[-300:]}")
            created, exp_id = True, nni_io.exp_id_of(out)
            if exp_id:  # a rerun continues the folds it does not finish
                with open(run_dir / FOLD_EXPERIMENTS, "a") as f:
                    f.write(f"{exp_id}\n")
        log(f"fold experiment on port {port} (web UI http://127.0.0.1:{port}): {config['maxTrialNumber']} trials")
        try:
            status = wait_until_ended(port, until)
        except KeyboardInterrupt:
            status = "INTERRUPTED"
        with STOP.deferred():  # a second signal waits until the trials are read
            trials = fold_trials(port, exp_id)
    finally:
        if created:  # stopped on every way out: no manager is left holding the port
            with STOP.deferred():
                nni_io.nnictl("stop", exp_id) if exp_id else nni_io.nnictl("stop", "--port", str(port))
    return trials, status


def wait_until_ended(port, until=None, poll_s=3):
    """The experiment's status once it has ended (DONE, ERROR, STOPPED), or DEADLINE once time.monotonic() passes
    `until`. NNI's own maxExperimentDuration only stops new trials: the ones running would go on past it."""
    while True:
        status = nni_io.rest(port, "check-status")["status"]
        if until is not None and time.monotonic() >= until:  # before DONE: NNI's own clock, started after ours, may end it too
            return "DEADLINE"
        if status in ("DONE", "ERROR", "STOPPED"):
            return status
        time.sleep(poll_s if until is None else max(0.0, min(poll_s, until - time.monotonic())))


def fold_trials(port, exp_id):
    """The fold experiment's trials: from its manager, or from its database where the manager is gone."""
    try:
        return from_rest(port).trials
    except (urllib.error.URLError, OSError, KeyError):
        return from_id(exp_id).trials if exp_id else []


# ----------------------------------------------------------------------------- bringing the models home
def check_fetched(folder):
    """Every copied file is what a finished fold run writes; UserError naming the first that is not."""
    summary = read_summary(folder)
    checkpoint.read_meta(folder / BEST)
    for name in (VAL_SOFT, SUBMISSION_SOFT, HISTORY):
        try:
            table = pd.read_csv(folder / name)
        except Exception as e:  # pandas' parser errors: the file, not our code
            raise UserError(f"{folder / name}: not a CSV ({type(e).__name__})") from None
        if table.empty or (name != HISTORY and "ImageID" not in table):
            raise UserError(f"{folder / name}: empty or without ImageID")
    return summary


def bring_home(trial, finalists, trial_command, run_dir, machines):
    """One fold trial's files -> run_dir/<finalist>/fold<i>/, put in place only when all are there and check out.
    Which finalist and fold it ran is read from its own config.json (NNI 3.0 can list another's parameters)."""
    tmp = run_dir / f".fetch-{trial.id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        nni_io.fetch(trial.log_path, tmp, machines, FETCHED)
        config = json.loads((tmp / CONFIG).read_text())
        ran = ran_configuration(tmp)
        finalist = next((f for f in finalists if configuration(trial_command, f.params) == ran), None)
        if finalist is None:
            raise UserError(f"trial {trial.id}: its config.json matches no finalist")
        check_fetched(tmp)
        target = run_dir / finalist.name / f"fold{config['fold']}"
        target.parent.mkdir(exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        return finalist.name, config["fold"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unfinished_folds(run_dir):
    """The output dirs (as paths on the machines that ran them) of the earlier fold experiments' trials that did not
    finish: stopped by a deadline or Ctrl-C, failed on a full disk or a lost server. An experiment gone from nnictl's
    registry is passed over."""
    path = run_dir / FOLD_EXPERIMENTS
    ids = path.read_text().split() if path.is_file() else []
    dirs = []
    for exp_id in ids:
        try:
            trials = from_id(exp_id).trials
        except LookupError:  # gone from the registry, or its database
            continue
        dirs += [t.log_path.split(":", 1)[1] if ":" in t.log_path else t.log_path for t in trials if t.status != "SUCCEEDED"]
    return dirs


def bring_all_home(trials, finalists, trial_command, run_dir, machines):
    """Every SUCCEEDED fold trial's files home, one line each; a trial whose server cannot be reached (or whose files
    do not check out) is one line naming it, and the others still come home: that fold is then missing, and trains
    again at the next run of finalize."""
    for trial in (t for t in trials if t.status == "SUCCEEDED"):
        try:
            print(f"home: {bring_home(trial, finalists, trial_command, run_dir, machines)} from {trial.log_path}", flush=True)
        except DiskFull:  # every next one would fail alike: one line for all
            raise
        except UserError as e:
            print(f"not home: trial {trial.id}: {e}", file=sys.stderr, flush=True)


def folds_home(run_dir, finalists, k):
    """(finalist, fold) pairs whose files are home (their folder exists only once every file checked out)."""
    return {(f.name, fold) for f in finalists for fold in range(k) if (run_dir / f.name / f"fold{fold}" / SUMMARY).is_file()}


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
    p.add_argument("--select", default="winner", choices=["winner", "greedy", "soup"],
                   help="the best finalist's folds, greedy ensemble selection over every finalist, or per fold a greedy "
                        "soup (averaged weights) of the finalists shaped like the winner (needs the data here)")
    p.add_argument("--defaults_only", action="store_true",
                   help="finalize the trial command's own flags alone (for a search that has not reported a result)")
    p.add_argument("--out", default=None, help="run dir (default runs/finalize_<EXP_ID>; a rerun there trains only what is missing)")
    p.add_argument("--fold_port", type=int, default=8091, help="port of the fold experiment's NNI manager")
    p.add_argument("--deadline", type=float, default=None,
                   help="minutes the fold experiment may run (also its maxExperimentDuration; unset, no limit): then it is "
                        "stopped, the folds that finished come home, and finalize exits 1 saying what is missing (a rerun "
                        "trains only that)")
    return p


def load_search(args):
    try:
        return from_rest(args.port) if args.port else from_id(args.id)
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"no NNI experiment answers on port {args.port} ({e})") from None
    except LookupError as e:
        raise UserError(str(e)) from None


@contextlib.contextmanager
def locked(run_dir):
    """One finalize at a time per run dir: two would train every fold twice and write over each other's results."""
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{run_dir}: another finalize.py (pid {f.read().strip() or '?'}) is running there; "
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
    try:
        saved = json.loads(path.read_text())
        finalists = [Finalist(**f) for f in saved["finalists"]]
    except (ValueError, TypeError, KeyError, AttributeError):  # JSON and UTF-8 errors are ValueErrors
        raise UserError(f"{path}: damaged (not the plan finalize wrote there): restore it, or delete it to plan the "
                        f"folds anew") from None
    changed = [f"--{k} {saved.get(k)} (now {v})" if k != "experiment" else f"experiment {saved.get(k)} (now {v})"
               for k, v in fixed.items() if saved.get(k) != v]
    if changed:
        raise UserError(f"{run_dir} was planned for {', '.join(changed)}: use another --out")
    for f in finalists:
        now = configuration(trial_command, f.params)
        if now != f.config:
            raise UserError(f"{run_dir} was planned with another trial command: {f.name} {differences(f.config, now)}; "
                            f"use the config it was planned with, or another --out")
    return finalists


def train_missing(args, config, run_dir, finalists, exp_id):
    """The fold experiment over what is not home yet, then every finished fold brought home, also when it ended early."""
    problem = nni_io.port_problem(args.fold_port, " (--fold_port)")
    if problem:
        raise UserError(problem)
    jobs = fold_jobs(finalists, args.k, folds_home(run_dir, finalists, args.k))
    unfinished = unfinished_folds(run_dir)
    if unfinished:  # each fold trial takes the last.pth of its own flags among them, where it runs (train.py)
        jobs = [dict(job, **{RETRY_OF: {"dirs": unfinished}}) for job in jobs]
    machines = nni_io.machines_of(config)
    fold_config = fold_experiment_config(args.config, exp_id, jobs, args.deadline)
    trials, status = run_fold_experiment(fold_config, run_dir, args.fold_port, deadline_s=args.deadline and args.deadline * 60)
    with STOP.deferred():  # each fold comes home whole or not at all
        bring_all_home(trials, finalists, nni_io.trial_command(config), run_dir, machines)
    missing = fold_jobs(finalists, args.k, folds_home(run_dir, finalists, args.k))
    came_home = (f"{len(jobs) - len(missing)} of the {len(jobs)} fold trainings came home to {run_dir}, the fold experiment "
                 f"is stopped; run finalize again to train only the other {len(missing)}")
    if status == "INTERRUPTED":
        raise KeyboardInterrupt(came_home)
    if status == "DEADLINE" and missing:  # a user's limit, as a failed fold is: exit 1, and a rerun goes on
        raise UserError(f"deadline {args.deadline:g} min reached: {came_home}")
    if missing:
        failed = [f"{t.log_path}/trial.stderr" for t in trials if t.status != "SUCCEEDED"]
        why = f"; why: {', '.join(failed[:2])}{f' and {len(failed) - 2} more' if len(failed) > 2 else ''}" if failed else ""
        if status == "DONE" and len(trials) < len(jobs) and fold_config.get("maxExperimentDuration"):
            why += f"; {len(jobs) - len(trials)} never started: its maxExperimentDuration {fold_config['maxExperimentDuration']} ran out"
        raise UserError(f"{len(missing)} fold trainings did not come home (the fold experiment ended {status}{why}); "
                        f"run finalize again to train only those")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.k < 2 or args.top < 1:
        raise UserError(f"--k {args.k} --top {args.top}: need K >= 2 and at least one finalist")
    if args.deadline is not None and not 0 < args.deadline < math.inf:  # written so that nan is refused too
        raise UserError(f"--deadline {args.deadline:g}: give the minutes the fold experiment may run, above 0")
    config = read_config(args.config)
    exp = load_search(args)
    run_dir = Path(args.out or Path("runs") / f"finalize_{exp.id}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked(run_dir):
        command = nni_io.trial_command(config)
        finalists = plan(run_dir, args, exp, select_finalists(exp, command, args.top, args.defaults_only), command)
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
    print((run_dir / REPORT).read_text(), flush=True)
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
