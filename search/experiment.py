"""Summarise an NNI experiment: trials sorted by metric, and the best one as a command.

    python baseline/experiment.py --port 8080            # a running experiment (REST API)
    python baseline/experiment.py --id EXP_ID            # by id: REST if it runs, else its nni.sqlite
    python baseline/experiment.py --port 8080 --csv trials.csv
    python baseline/experiment.py --id EXP_ID --fetch TRIAL_ID   # that trial's output dir -> runs/<EXP_ID>_<TRIAL_ID>
    python baseline/experiment.py --id EXP_ID --fetch TRIAL_ID --partial   # also a trial that did not finish

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

Every error is one line on stderr and exit 1 (2 for a usage error).
"""
import argparse
import contextlib
import csv
import json
import math
import re
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from baseline.preflight import machines_of, ssh_base  # noqa: E402
from core.cli import Parser, run_main  # noqa: E402
from core.runs import SUMMARY  # noqa: E402


STATUS_ORDER = {"SUCCEEDED": 0, "EARLY_STOPPED": 1, "USER_CANCELED": 2, "RUNNING": 3, "WAITING": 4,
                "FAILED": 5, "SYS_CANCELED": 6, "UNKNOWN": 7}


@dataclass
class Trial:
    id: str
    status: str
    sequence: int = -1
    params: dict = field(default_factory=dict)
    parameter_id: str | None = None    # an int for most tuners, "0-2_0_3" for Hyperband: kept as text
    intermediates: list[dict] = field(default_factory=list)   # in the order reported
    final: dict | None = None
    log_path: str = ""

    @property
    def metric(self):
        """The final metric's "default" value, or None."""
        return None if self.final is None else self.final.get("default")

    def best_intermediate_for(self, maximize):
        """The best intermediate "default" value, or None when none is a number."""
        values = [m["default"] for m in self.intermediates if _is_number(m.get("default"))]
        return None if not values else (max(values) if maximize else min(values))


@dataclass
class Experiment:
    id: str
    status: str
    params: dict
    trials: list[Trial]
    source: str

    @property
    def maximize(self):
        tuner = self.params.get("tuner") or {}
        mode = ((tuner.get("classArgs") or {}).get("optimize_mode") or "maximize").lower()
        return mode != "minimize"

    @property
    def trial_command(self):
        ts = self.params.get("trainingService")
        ts = ts[0] if isinstance(ts, list) and ts else ts
        return self.params.get("trialCommand") or (ts or {}).get("trialCommand") or "python3 train.py"


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _metric(data):
    """NNI stores a metric as a JSON string of a JSON string of a number or a dict."""
    value = data
    for _ in range(3):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                break
    if isinstance(value, dict):
        return value
    return {"default": value}


def _hyper(value):
    """A hyperparameter record ({"parameter_id", "parameters", ...}) as a dict, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) and "parameters" in value else None


SENT = re.compile(r"Trial parameter: (\w+) (\{.*\})\s*$")
ASSESSOR_STOP = re.compile(r'cancelTrialJob: "(\w+)"')  # the assessor's KILL_TRIAL_JOB command


def read_manager_log(log_dir):
    """From nnimanager.log, when it is on this machine: trial id -> the parameter set the
    training service sent it ("Trial parameter: ID {...}", logged by NNI 3.0's local and
    remote services), and the ids of the trials the assessor stopped.
    log_dir may be None (no log here)."""
    sent = {}
    stopped = set()
    path = Path(log_dir) / "nnimanager.log" if log_dir else None
    if not path or not path.is_file():
        return sent, stopped
    with open(path, errors="replace") as f:
        for line in f:
            if (m := SENT.search(line)) and (h := _hyper(m.group(2))):
                sent[m.group(1)] = h
            elif m := ASSESSOR_STOP.search(line):
                stopped.add(m.group(1))
    return sent, stopped


def _assemble(exp_id, status, params, trial_rows, metric_rows, source, manager_log):
    """trial_rows: (id, status, sequence, [hyperparameter dicts], log_path); metric_rows: (trial, param_id, type, data);
    manager_log: what read_manager_log found."""
    sent, assessor_stopped = manager_log
    by_param = {}
    trials = {}
    for tid, tstatus, seq, hypers, log_path in trial_rows:
        # NNI 3.0 lists an assessor stop as USER_CANCELED: compat.js marks the stop as early
        # only after the stopped trial's end event has set its status
        if tstatus == "USER_CANCELED" and tid in assessor_stopped:
            tstatus = "EARLY_STOPPED"
        t = Trial(tid, tstatus or "UNKNOWN", seq if seq is not None else -1, log_path=log_path or "")
        for h in hypers:
            by_param[str(h["parameter_id"])] = h["parameters"]
            if t.parameter_id is None:
                t.parameter_id, t.params = str(h["parameter_id"]), h["parameters"]
        trials[tid] = t
    reported = {}
    for tid, pid, mtype, data in metric_rows:
        t = trials.setdefault(tid, Trial(tid, "UNKNOWN"))
        if pid not in (None, ""):
            reported.setdefault(tid, str(pid))
        if mtype == "FINAL":
            t.final = _metric(data)
        elif mtype == "PERIODICAL":
            t.intermediates.append(_metric(data))
    # What each trial really ran (see module doc): the parameter set sent to it, else the
    # parameter id it reported with its metrics, else (a trial that reported nothing)
    # the one set no other trial ran if it is the only such trial, else its own listing.
    known = {}
    for tid, h in sent.items():
        if tid in trials:
            by_param.setdefault(str(h["parameter_id"]), h["parameters"])
            known[tid] = str(h["parameter_id"])
    for tid, pid in reported.items():
        known.setdefault(tid, pid)
    unknown = [t for t in trials.values() if t.id not in known]
    free = set(by_param) - set(known.values())
    if len(unknown) == 1 and len(free) == 1:
        known[unknown[0].id] = free.pop()
    for tid, pid in known.items():
        if pid in by_param:
            trials[tid].parameter_id, trials[tid].params = pid, by_param[pid]
    return Experiment(exp_id, status, params, list(trials.values()), source)


# ----------------------------------------------------------------------------- sources
def _get(base, path, timeout):
    with urllib.request.urlopen(f"{base}/api/v1/nni/{path}", timeout=timeout) as r:
        return json.loads(r.read().decode())


def from_rest(port, host="127.0.0.1", timeout=10):
    base = f"http://{host}:{port}"
    profile = _get(base, "experiment", timeout)
    status = _get(base, "check-status", timeout).get("status", "UNKNOWN")
    jobs = _get(base, "trial-jobs", timeout)
    metrics = _get(base, "metric-data", timeout)
    rows = []
    for j in jobs:
        hypers = [h for h in (_hyper(x) for x in j.get("hyperParameters") or []) if h]
        rows.append((j["trialJobId"], j.get("status"), j.get("sequenceId"), hypers, j.get("logPath")))
    mrows = [(m["trialJobId"], m.get("parameterId"), m.get("type"), m.get("data")) for m in metrics]
    log_dir = Path(profile["logDir"]) / "log" if profile.get("logDir") else None
    return _assemble(profile.get("id", "?"), status, profile.get("params", {}), rows, mrows, f"{base} (REST)",
                     read_manager_log(log_dir))


def from_sqlite(db, exp_id, status="STOPPED"):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        prof = con.execute("SELECT params FROM ExperimentProfile ORDER BY revision DESC LIMIT 1").fetchone()
        params = json.loads(prof[0]) if prof else {}
        events = con.execute("SELECT timestamp, trialJobId, event, data, logPath, sequenceId FROM TrialJobEvent "
                             "ORDER BY timestamp, rowid").fetchall()
        metrics = con.execute("SELECT trialJobId, parameterId, type, data FROM MetricData "
                              "ORDER BY timestamp, sequence").fetchall()
    finally:
        con.close()
    state = {}
    for _ts, tid, event, data, log_path, seq in events:
        row = state.setdefault(tid, [tid, event, seq, [], log_path])
        row[1] = event
        row[2] = seq if seq is not None else row[2]
        row[4] = log_path or row[4]
        h = _hyper(data)
        if h and all(h["parameter_id"] != x["parameter_id"] for x in row[3]):
            row[3].append(h)
    return _assemble(exp_id, status, params, [tuple(r) for r in state.values()], metrics, str(db),
                     read_manager_log(Path(db).parent.parent / "log"))


def registry(home=None):
    path = (home or Path.home()) / "nni-experiments" / ".experiment"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def from_id(exp_id, timeout=10):
    reg = registry()
    info = reg.get(exp_id)
    if info is None:
        known = ", ".join(sorted(reg)) or "none"
        raise LookupError(f"experiment {exp_id!r} is not in nnictl's registry "
                          f"({Path.home() / 'nni-experiments' / '.experiment'}; known: {known})")
    if info.get("status") != "STOPPED" and info.get("port"):
        try:
            exp = from_rest(int(info["port"]), timeout=timeout)
            if exp.id == exp_id:
                return exp
        except (OSError, urllib.error.URLError, ValueError):
            pass  # not answering: read its database
    log_dir = Path(info.get("logDir") or Path.home() / "nni-experiments")
    db = log_dir / exp_id / "db" / "nni.sqlite"
    if not db.is_file():
        raise LookupError(f"experiment {exp_id}: not running and no database at {db}")
    return from_sqlite(db, exp_id, info.get("status", "STOPPED"))


# ----------------------------------------------------------------------------- output
def flatten(params):
    """{"criterion": {"_name": "focal", "focal_gamma": 2}} -> {"criterion": "focal", "focal_gamma": 2};
    Hyperband's {"TRIAL_BUDGET": 9} -> {"epochs": 9}, as train.py reads it."""
    from training.flags import trial_budget  # lazy: the flag module imports torch, which listing trials does not need

    flat = {}
    for k, v in trial_budget(params).items():
        if isinstance(v, dict) and "_name" in v:
            flat[k] = v["_name"]
            flat.update(flatten({kk: vv for kk, vv in v.items() if kk != "_name"}))
        else:
            flat[k] = v
    return flat


def flag_words(params):
    words = []
    for k, v in flatten(params).items():
        if v is None or v is False:
            continue
        if v is True:
            words.append(f"--{k}")
        elif isinstance(v, (list, tuple)):
            words += [f"--{k}", *(_fmt(x) for x in v)]
        else:
            words += [f"--{k}", _fmt(v)]
    return words


def _fmt(v):
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))  # quniform's 32.0: "32" parses as an int flag and as a float flag
    return str(v)


def best_command(trial_command, params):
    """trialCommand with the trial's flags replacing any given there."""
    words = shlex.split(trial_command)
    keys = {f"--{k}" for k in flatten(params)}
    kept, skip = [], False
    for w in words:
        if w.startswith("--"):
            skip = w.split("=", 1)[0] in keys
            if skip:
                continue
        elif skip:
            continue
        kept.append(w)
    return shlex.join(kept + flag_words(params))


def ranked(exp):
    sign = -1 if exp.maximize else 1

    def key(t):
        m = t.metric if _is_number(t.metric) else t.best_intermediate_for(exp.maximize)
        return (0 if _is_number(t.metric) else 1 if m is not None else 2,
                sign * m if m is not None else 0, STATUS_ORDER.get(t.status, 9), t.sequence)
    return sorted(exp.trials, key=key)


def best_trial(exp):
    order = ranked(exp)
    if order and (_is_number(order[0].metric) or order[0].best_intermediate_for(exp.maximize) is not None):
        return order[0]
    return None


def _num(v):
    return f"{v:.4f}" if _is_number(v) else "-"


def report(exp, out=None):
    out = out or sys.stdout  # looked up per call: a test's capture replaces sys.stdout after import
    mode = "maximize" if exp.maximize else "minimize"
    tuner = (exp.params.get("tuner") or {}).get("name", "?")
    print(f"experiment {exp.id} [{exp.status}] from {exp.source}: {len(exp.trials)} trials, {tuner} {mode}", file=out)
    rows = [("rank", "trial", "status", "metric", "best_int", "epochs", "parameters")]
    for i, t in enumerate(ranked(exp), 1):
        p = " ".join(f"{k}={v}" for k, v in sorted(flatten(t.params).items()))
        rows.append((str(i), t.id, t.status, _num(t.metric), _num(t.best_intermediate_for(exp.maximize)),
                     str(len(t.intermediates)), p))
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
            w.writerow([i, t.id, t.status, t.sequence, t.parameter_id, t.metric if _is_number(t.metric) else "",
                        t.best_intermediate_for(exp.maximize) or "", len(t.intermediates),
                        *(json.dumps(flat[k]) if isinstance(flat.get(k), (list, dict)) else flat.get(k, "") for k in keys),
                        t.log_path])


# ----------------------------------------------------------------------------- a trial's files
def fetch(source, target, machines=(), names=None):
    """A trial's output dir -> target (an existing, empty dir): every file, or only those named.
    source: a local dir, or NNI's remote "host:~/path" (copied with tar over SSH as machines[host] logs in).
    ValueError naming what could not be copied; what was copied so far is left for the caller to remove."""
    target = Path(target)
    if ":" not in source or Path(source).is_dir():
        src = Path(source)
        for name in names or [p.relative_to(src) for p in sorted(src.rglob("*")) if p.is_file()]:
            if not (src / name).is_file():
                raise ValueError(f"{src / name}: missing")
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, target / name)
        return
    host, path = source.split(":", 1)
    candidates = [m for m in machines if m.host == host]
    if not candidates:
        raise ValueError(f"trial output {source}: no machine {host} in the experiment's machineList")
    path = path.removeprefix("~/")  # ssh runs the command in the user's home
    command = f"tar -C {shlex.quote(path)} -cf - -- " + (shlex.join(names) if names else ".")
    with tempfile.TemporaryFile() as archive:
        for machine in candidates:  # the same host may be listed once per GPU set
            archive.seek(0)
            archive.truncate()
            proc = subprocess.run([*ssh_base(machine, 15), command], stdout=archive, stderr=subprocess.PIPE, timeout=3600)
            if proc.returncode == 0:
                break
        else:
            reason = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.strip()]
            raise ValueError(f"{host}:{path}: could not copy ({reason[0] if reason else f'ssh exit {proc.returncode}'})")
        archive.seek(0)
        try:
            with tarfile.open(fileobj=archive) as tar:
                tar.extractall(target, filter="data")  # "data": no absolute paths, links out or devices
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{host}:{path}: the copy is damaged ({e})") from None


# NNI's own logs of the trial process (trial keeper, nni.runtime): open while train.py lists its files, and
# empty when nothing went there, so a copy may hold them empty
NNI_LOGS = {"trial.stdout", "trial.stderr", "trial.log"}
FINISHED = {"SUCCEEDED", "EARLY_STOPPED", "USER_CANCELED", "FAILED", "SYS_CANCELED"}
ENDED = {"STOPPED", "VIEWED"}  # no NNI process runs for it: a trial it still lists as RUNNING is not writing


def trial_to_fetch(exp, trial_id):
    """The trial --fetch copies; ValueError when there is none, it is still being written, or its local dir is gone."""
    trial = next((t for t in exp.trials if t.id == trial_id), None)
    if trial is None or not trial.log_path:
        raise ValueError(f"experiment {exp.id} has no trial {trial_id!r} with an output dir "
                         f"(trials: {', '.join(t.id for t in exp.trials) or 'none'})")
    if trial.status not in FINISHED and exp.status not in ENDED:
        raise ValueError(f"trial {trial_id} is {trial.status}: its files are not all written yet; wait for it to end "
                         f"or stop the experiment (nnictl stop {exp.id}), then fetch it")
    if ":" not in trial.log_path and not Path(trial.log_path).is_dir():  # fetch() would copy nothing and call it done
        raise ValueError(f"trial {trial_id} ({trial.status}): its output dir {trial.log_path} is gone, nothing to fetch")
    return trial


def check_copy(folder, trial, partial=False):
    """ValueError unless folder is the whole of a finished run: summary.json, and every file it lists there and
    not empty (a listed directory, such as tensorboard/, only there). -> False for an unfinished run's
    files taken with partial."""
    source = trial.log_path
    if not (folder / SUMMARY).is_file():
        if partial:
            return False
        names = sorted(p.name + "/" * p.is_dir() for p in folder.iterdir())
        raise ValueError(f"trial {trial.id} ({trial.status}): no {SUMMARY}, so the run did not finish; its dir has "
                         f"{', '.join(names) or 'no files'} (--partial copies them anyway)")
    try:
        listed = json.loads((folder / SUMMARY).read_text()).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"trial {trial.id}: {source}/{SUMMARY} is not a valid summary, the copy is refused") from None
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise ValueError(f"trial {trial.id}: {source}/{SUMMARY} lists no files, the copy is refused")
    missing = [n for n in listed if not (folder / n).exists()]
    empty = [n for n in listed if n not in NNI_LOGS and (folder / n).is_file() and (folder / n).stat().st_size == 0]
    if missing or empty:
        what = "; ".join(f"{kind} {', '.join(names)}" for kind, names in (("missing", missing), ("empty", empty)) if names)
        raise ValueError(f"trial {trial.id}: the copy of {source} is incomplete ({what}, all listed in its {SUMMARY})")
    return True


def fetch_trial(exp, trial_id, out, partial=False):
    """experiment.py --fetch: one trial's whole output dir -> out, put in place only once all of it is there
    and matches the run's summary.json. partial: also take a finished trial without summary.json (a run that
    failed or was stopped before its end) as it is."""
    trial = trial_to_fetch(exp, trial_id)
    out = Path(out or Path("runs") / f"{exp.id}_{trial_id}")
    if out.exists():
        raise ValueError(f"{out} exists: give another --out")
    ts = exp.params.get("trainingService")
    remote = any(isinstance(s, dict) and s.get("platform") == "remote" for s in (ts if isinstance(ts, list) else [ts]))
    made = [p for p in out.parents if not p.exists()]  # deepest first: removed again if the fetch fails
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    try:
        fetch(trial.log_path, tmp, machines_of(exp.params) if remote else [])
        complete = check_copy(tmp, trial, partial)
        os.rename(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:  # a local file that cannot be read, ssh missing or hanging
        raise ValueError(f"trial {trial_id}: could not copy {trial.log_path} ({getattr(e, 'strerror', None) or e})") from None
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
    p.add_argument("--partial", action="store_true",
                   help="with --fetch: also copy a trial that ended without summary.json (failed, or stopped before its "
                        "end, e.g. by the assessor) as it is: best.pth may be there, the rest of the run is not")
    return p


def load(args):
    """The experiment --port or --id names; ValueError in one line when it cannot be read."""
    if args.port is not None:
        where = f"{args.host}:{args.port}"
        try:
            return from_rest(args.port, args.host)
        except (urllib.error.URLError, OSError) as e:
            raise ValueError(f"no NNI experiment answers on {where} ({getattr(e, 'reason', None) or e})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # some other HTTP server on that port
            raise ValueError(f"{where} answers, but not as NNI's REST API ({type(e).__name__}: {e})") from None
    try:
        return from_id(args.id)
    except LookupError as e:  # not registered, or registered without a database
        raise ValueError(e.args[0] if e.args else repr(e)) from None
    except (OSError, sqlite3.Error) as e:
        raise ValueError(f"experiment {args.id}: cannot read its nni.sqlite ({e})") from None


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.fetch and (a.csv or a.json):
        p.error("--fetch prints no table: leave out --csv and --json")
    if not a.fetch and (a.out or a.partial):
        p.error("--out and --partial go with --fetch")
    exp = load(a)
    if a.fetch:
        fetch_trial(exp, a.fetch, a.out, a.partial)
        return
    if a.csv:  # before the table: a path that cannot be written is the one line the user sees
        try:
            write_csv(exp, a.csv)
        except OSError as e:
            raise ValueError(f"--csv {a.csv}: cannot write it ({e.strerror or e})") from None
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
