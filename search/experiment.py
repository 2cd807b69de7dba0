"""Summarise an NNI experiment: trials sorted by metric, and the best one as a command.

    python search/experiment.py --port 8080            # a running experiment (REST API)
    python search/experiment.py --id EXP_ID            # by id: REST if it runs, else its nni.sqlite
    python search/experiment.py --port 8080 --csv trials.csv
    python search/experiment.py --id EXP_ID --fetch TRIAL_ID   # that trial's output dir -> runs/<EXP_ID>_<TRIAL_ID>
    python search/experiment.py --id EXP_ID --fetch TRIAL_ID --partial   # also a trial that did not finish
    python search/experiment.py --port 8080 --retry-failed   # each FAILED trial again, from its last.pth where found

The table lists every trial with its status, final metric ("default"), best
intermediate metric, epochs reported and parameters. The best trial's
parameters are printed as a ready `python3 train.py ...` command: the
experiment's trialCommand with the searched flags put in (lists as space
separated values, True booleans as bare flags, nested choices flattened).

In NNI 3.0 the REST trial list can show another trial's parameters: the
training service hands parameter sets out in the order trials ask for them.
So a trial's parameters are taken from nnimanager.log's "Trial parameter: ID
{...}" line when the experiment's log is on this machine, else from the
parameter id the trial reported with its metrics.

NNI 3.0's remote training service leaves every trial's output dir (best.pth, submissions...) on the
server that ran it and downloads only its logs: --fetch copies one home over SSH, with the user,
port and key of the experiment's own machineList.

A fetch is whole or fails, leaving no --out: train.py writes summary.json last, listing the run's
files, so the copy must hold it and every file it lists, none empty (a listed directory such as
tensorboard/ must be there; NNI's own trial.stdout/stderr/log may be empty). It refuses a trial
still RUNNING or WAITING (wait, or stop the experiment: once it is stopped, a trial its database
still calls RUNNING is judged by its files), one whose output dir is gone, and one without
summary.json: that run failed or was stopped before its end (by the assessor, or a cancel), and
the refusal names the files it has. --partial copies such a run as it is, best.pth included
when it got that far; it never takes a finished run whose copy lacks a listed file.

--retry-failed resubmits the parameters of each FAILED (or SYS_CANCELED) trial of a running experiment once, as an
NNI customized trial with RETRY_OF in its parameters, maxTrialNumber raised to make room: NNI 3.0 itself reruns one
trial at a time, by hand in the web UI, and no tuner learns from that rerun. A retry on the machine that holds the
retried trial's last.pth continues it (train.py checks its hash and its flags), elsewhere it starts over and says
so; under SafeTPE it reports its result with the retried trial's parameter id, so TPE learns it.

Every error is one line on stderr and exit 1 (2 for a usage error).
"""
import argparse
import contextlib
import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import urllib.error
from pathlib import Path

from core.cli import Parser, UserError, run_main
from core.runs import RETRY_OF, SUMMARY, incomplete, listed_files
from search import nni_io
from search.trials import best_command, best_trial, flatten, from_id, from_rest, is_number, ranked


def _num(v):
    return f"{v:.4f}" if is_number(v) else "-"


def report(exp, out=None):
    out = out or sys.stdout  # looked up per call: a test's capture replaces sys.stdout after import
    mode = "maximize" if exp.maximize else "minimize"
    tuner = exp.params.get("tuner") or {}
    tuner = tuner.get("name") or tuner.get("className", "?")
    print(f"experiment {exp.id} [{exp.status}] from {exp.source}: {len(exp.trials)} trials, {tuner} {mode}", file=out)
    rows = [("rank", "trial", "status", "metric", "best_int", "epochs", "parameters")]
    for i, t in enumerate(ranked(exp), 1):
        p = " ".join(f"{k}={v}" for k, v in sorted(flatten(t.params).items()))
        trial = t.id + (f" (retries {t.retries})" if t.retries else "")
        rows.append((str(i), trial, t.status, _num(t.metric), _num(t.best_intermediate_for(exp.maximize)), str(len(t.intermediates)), p))
    widths = [max(len(r[c]) for r in rows) for c in range(6)]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(6)) + "  " + r[6], file=out)
    best = best_trial(exp)
    if best is None:
        print("no trial has reported a metric yet", file=out)
        return
    print(f"\nbest trial {best.id}: metric {_num(best.metric)}, output {best.log_path or '?'}", file=out)
    print(best_command(exp.trial_command, best.params), file=out)


def write_csv(exp, path):
    order = ranked(exp)
    keys = sorted({k for t in order for k in flatten(t.params)})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "trial", "status", "sequence", "parameter_id", "metric", "best_intermediate",
                     "epochs", *keys, "output"])
        for i, t in enumerate(order, 1):
            flat = flatten(t.params)
            w.writerow([i, t.id, t.status, t.sequence, t.parameter_id, t.metric if is_number(t.metric) else "",
                        t.best_intermediate_for(exp.maximize) or "", len(t.intermediates),
                        *(json.dumps(flat[k]) if isinstance(flat.get(k), (list, dict)) else flat.get(k, "") for k in keys),
                        t.log_path])


# ----------------------------------------------------------------------------- retrying
RETRIED = ("FAILED", "SYS_CANCELED")  # not USER_CANCELED: a person or the assessor stopped it on purpose


def retry_failed(exp, port, host):
    """Each trial in RETRIED status that no trial retries yet, resubmitted once to the experiment on host:port."""
    if exp.status in ENDED:
        raise UserError(f"experiment {exp.id} is {exp.status}: resume it first (imgcls-nnictl resume {exp.id})")
    profile = nni_io.rest(port, "experiment", host)
    taken = {t.retries for t in exp.trials} | queued_retries(profile)
    todo = [t for t in exp.trials if t.status in RETRIED and t.id not in taken]
    if not todo:
        print(f"nothing to retry: no FAILED trial in {exp.id} that is not retried already")
        return
    tuner = (exp.params.get("tuner") or {}).get("className") or (exp.params.get("tuner") or {}).get("name", "?")
    # Stock TPE fails on the result of an id whose trial ended (KeyError), Hyperband's brackets count their own; and
    # after a resume no dispatcher knows the ids from before: NNI 3.0's would fail on one below those it recovered
    resumed = was_resumed(profile)
    learns = tuner.endswith("SafeTPE") and not resumed
    if profile["params"].get("maxTrialNumber"):
        profile["params"]["maxTrialNumber"] += len(todo)
        nni_io.rest(port, "experiment?update_type=MAX_TRIAL_NUM", host, body=profile, method="PUT")
    for t in todo:
        note = {"trial": t.id, **({"parameter_id": int(t.parameter_id)} if learns and (t.parameter_id or "").isdigit() else {})}
        sequence = nni_io.rest(port, "trial-jobs", host, body={**t.params, RETRY_OF: note}, method="POST")["sequenceId"]
        print(f"trial {t.id} ({t.status}) retries as trial #{sequence}: from its last.pth on the machine that holds it, "
              f"else from the start")
    if not learns:
        print(f"the tuner ({tuner}) does not learn the retries' results: " +
              ("this experiment was resumed, and its tuner never issued the failed trials' parameters (it is given them at "
               "the next resume)" if resumed else "NNI hands a customized trial's result to no tuner but SafeTPE"))
    if profile["params"].get("maxTrialNumber"):
        print(f"maxTrialNumber is now {profile['params']['maxTrialNumber']}")


def was_resumed(profile):
    """Whether the experiment's manager log (on this machine) says it was resumed."""
    log = Path(profile.get("logDir") or "") / "log" / "nnimanager.log"
    return bool(profile.get("logDir")) and log.is_file() and "Resuming experiment:" in log.read_text(errors="replace")


def queued_retries(profile):
    """The trials retried already whose retry NNI has not started: its trial list shows no waiting customized trial,
    its database (on this machine, with the manager) records each as ADD_CUSTOMIZED."""
    db = Path(profile.get("logDir") or "") / "db" / "nni.sqlite"
    if not profile.get("logDir") or not db.is_file():
        return set()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT data FROM TrialJobEvent WHERE event = 'ADD_CUSTOMIZED'").fetchall()
    finally:
        con.close()
    notes = [json.loads(data).get(RETRY_OF) for (data,) in rows]
    return {note.get("trial") for note in notes if isinstance(note, dict)}


# ----------------------------------------------------------------------------- a trial's files
# NNI's own logs of the trial process (trial keeper, nni.runtime): open while train.py lists its files, and
# empty when nothing went there, so a copy may hold them empty
NNI_LOGS = {"trial.stdout", "trial.stderr", "trial.log"}
FINISHED = {"SUCCEEDED", "EARLY_STOPPED", "USER_CANCELED", "FAILED", "SYS_CANCELED"}
ENDED = {"STOPPED", "VIEWED"}  # no NNI process runs for it: a trial it still lists as RUNNING is not writing


def trial_to_fetch(exp, trial_id):
    """The trial --fetch copies; UserError when there is none, it is still being written, or its local dir is gone."""
    trial = next((t for t in exp.trials if t.id == trial_id), None)
    if trial is None or not trial.log_path:
        raise UserError(f"experiment {exp.id} has no trial {trial_id!r} with an output dir "
                        f"(trials: {', '.join(t.id for t in exp.trials) or 'none'})")
    if trial.status not in FINISHED and exp.status not in ENDED:
        raise UserError(f"trial {trial_id} is {trial.status}: its files are not all written yet; wait for it to end "
                        f"or stop the experiment (nnictl stop {exp.id}), then fetch it")
    if ":" not in trial.log_path and not Path(trial.log_path).is_dir():  # fetch() would copy nothing and call it done
        raise UserError(f"trial {trial_id} ({trial.status}): its output dir {trial.log_path} is gone, nothing to fetch")
    return trial


def check_copy(folder, trial, partial=False):
    """UserError unless folder is the whole of a finished run: summary.json, and every file it lists there and
    not empty (a listed directory, such as tensorboard/, only there). -> False for an unfinished run's
    files taken with partial."""
    source = trial.log_path
    if not (folder / SUMMARY).is_file():
        if partial:
            return False
        names = sorted(p.name + "/" * p.is_dir() for p in folder.iterdir())
        raise UserError(f"trial {trial.id} ({trial.status}): no {SUMMARY}, so the run did not finish; its dir has "
                        f"{', '.join(names) or 'no files'} (--partial copies them anyway)")
    try:
        listed = listed_files(folder)
    except ValueError as e:
        raise UserError(f"trial {trial.id}: {source}/{SUMMARY} {e}, the copy is refused") from None
    what = incomplete(folder, listed, may_be_empty=NNI_LOGS)
    if what:
        raise UserError(f"trial {trial.id}: the copy of {source} is incomplete ({what}, all listed in its {SUMMARY})")
    return True


def fetch_trial(exp, trial_id, out, partial=False):
    """experiment.py --fetch: one trial's whole output dir -> out, put in place only once all of it is there
    and matches the run's summary.json. partial: also take a finished trial without summary.json (a run that
    failed or was stopped before its end) as it is."""
    trial = trial_to_fetch(exp, trial_id)
    out = Path(out or Path("runs") / f"{exp.id}_{trial_id}")
    if out.exists():
        raise UserError(f"{out} exists: give another --out")
    made = [p for p in out.parents if not p.exists()]  # deepest first: removed again if the fetch fails
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    try:
        nni_io.fetch(trial.log_path, tmp, nni_io.machines_of(exp.params))
        complete = check_copy(tmp, trial, partial)
        os.rename(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:  # a local file that cannot be read, ssh missing or hanging
        raise UserError(f"trial {trial_id}: could not copy {trial.log_path} ({getattr(e, 'strerror', None) or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made if not out.exists() else ():
            with contextlib.suppress(OSError):
                p.rmdir()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    print(f"trial {trial_id} ({trial.status}): {len(files)} files from {trial.log_path} -> {out}: "
          f"{', '.join(f for f in files if '/' not in f)}"
          + ("" if complete else f" (partial: no {SUMMARY}, the run did not finish)"))
    return out


def _port(text):
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1..65535)")
    return int(text)


def build_parser():
    p = Parser(prog="experiment.py", description="List an NNI experiment's trials by metric and print the best as a command.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--port", type=_port, help="port of a running experiment (nnictl create --port)")
    g.add_argument("--id", help="experiment id (nnictl experiment list); a stopped one is read from its nni.sqlite")
    p.add_argument("--host", default="127.0.0.1", help="host of the NNI manager with --port (default: 127.0.0.1)")
    p.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    p.add_argument("--json", action="store_true", help="print the best trial as JSON instead of the table")
    p.add_argument("--fetch", metavar="TRIAL_ID", help="copy that trial's output dir here (over SSH for a remote trial) "
                                                        "instead of printing the table; only a finished trial, and only "
                                                        "all of it: every file its summary.json lists")
    p.add_argument("--out", type=Path, help="where --fetch puts it (default: runs/<EXP_ID>_<TRIAL_ID>)")
    p.add_argument("--retry-failed", action="store_true",
                   help="resubmit each FAILED trial of the running experiment once, continuing from its last.pth where "
                        "the machine that runs the retry holds it; maxTrialNumber is raised to make room")
    p.add_argument("--partial", action="store_true",
                   help="with --fetch: also copy a trial that ended without summary.json (failed, or stopped before its "
                        "end, e.g. by the assessor) as it is: best.pth may be there, the rest of the run is not")
    return p


def load(args):
    """The experiment --port or --id names; UserError in one line when it cannot be read."""
    if args.port is not None:
        where = f"{args.host}:{args.port}"
        try:
            return from_rest(args.port, args.host)
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"no NNI experiment answers on {where} ({getattr(e, 'reason', None) or e})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # some other HTTP server on that port
            raise UserError(f"{where} answers, but not as NNI's REST API ({type(e).__name__}: {e})") from None
    try:
        return from_id(args.id)
    except LookupError as e:  # not registered, or registered without a database
        raise UserError(e.args[0] if e.args else repr(e)) from None
    except (OSError, sqlite3.Error) as e:
        raise UserError(f"experiment {args.id}: cannot read its nni.sqlite ({e})") from None


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.fetch and (a.csv or a.json):
        p.error("--fetch prints no table: leave out --csv and --json")
    if not a.fetch and (a.out or a.partial):
        p.error("--out and --partial go with --fetch")
    if a.retry_failed and (a.fetch or a.csv or a.json):
        p.error("--retry-failed prints no table and fetches nothing: give it alone")
    exp = load(a)
    if a.retry_failed:
        info = nni_io.registry().get(exp.id, {}) if a.port is None else {}
        retry_failed(exp, a.port or info.get("port"), a.host)
        return
    if a.fetch:
        fetch_trial(exp, a.fetch, a.out, a.partial)
        return
    if a.csv:  # before the table: a path that cannot be written is the one line the user sees
        try:
            write_csv(exp, a.csv)
        except OSError as e:
            raise UserError(f"--csv {a.csv}: cannot write it ({e.strerror or e})") from None
    if a.json:
        best = best_trial(exp)
        print(json.dumps(None if best is None else {
            "trial": best.id, "metric": best.metric, "params": best.params, "output": best.log_path,
            "command": best_command(exp.trial_command, best.params)}, indent=2))
    else:
        report(exp)
    if a.csv:
        print(f"wrote {a.csv}", file=sys.stderr)


def cli(argv=None):
    return run_main("experiment.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
