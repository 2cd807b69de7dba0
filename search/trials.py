"""An NNI experiment's trials as the search tools read them: from the REST API of a running experiment, or
from the nni.sqlite of a stopped one; ranked by metric, and a trial's parameters as train.py flags.

In NNI 3.0 the REST trial list can show another trial's parameters: the training service hands parameter
sets out in the order trials ask for them. So a trial's parameters are taken from nnimanager.log's "Trial
parameter: ID {...}" line when the experiment's log is on this machine, else from the parameter id the
trial reported with its metrics.
"""
import json
import math
import re
import shlex
import sqlite3
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

from core.runs import RETRY_OF
from search import nni_io

STATUS_ORDER = {"SUCCEEDED": 0, "EARLY_STOPPED": 1, "USER_CANCELED": 2, "RUNNING": 3, "WAITING": 4,
                "FAILED": 5, "SYS_CANCELED": 6, "UNKNOWN": 7}


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    def retries(self):
        """The id of the trial this one retries (`imgcls-experiment --retry-failed`), or None."""
        note = self.params.get(RETRY_OF)
        return note.get("trial") if isinstance(note, dict) else None

    @property
    def metric(self):
        """The final metric's "default" value, or None."""
        return None if self.final is None else self.final.get("default")

    def best_intermediate_for(self, maximize):
        """The best intermediate "default" value, or None when none is a number."""
        values = [m["default"] for m in self.intermediates if is_number(m.get("default"))]
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
        return nni_io.trial_command(self.params) or "python3 train.py"


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


def assemble(exp_id, status, params, trial_rows, metric_rows, source, manager_log):
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
        for i, h in enumerate(hypers):
            pid = None if h["parameter_id"] is None else str(h["parameter_id"])  # None: a customized trial (a retry)
            if pid is not None:
                by_param[pid] = h["parameters"]
            if i == 0:
                t.parameter_id, t.params = pid, h["parameters"]
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
    known, settled = {}, set()
    for tid, h in sent.items():
        if tid not in trials:
            continue
        if h["parameter_id"] is None:  # customized: no id to look up (a retry reports the retried trial's), the set is its own
            trials[tid].parameter_id, trials[tid].params = None, h["parameters"]
            settled.add(tid)
        else:
            by_param.setdefault(str(h["parameter_id"]), h["parameters"])
            known[tid] = str(h["parameter_id"])
    for tid, pid in reported.items():
        if tid not in settled:
            known.setdefault(tid, pid)
    unknown = [t for t in trials.values() if t.id not in known and t.id not in settled]
    free = set(by_param) - set(known.values())
    if len(unknown) == 1 and len(free) == 1:
        known[unknown[0].id] = free.pop()
    for tid, pid in known.items():
        if pid in by_param:
            trials[tid].parameter_id, trials[tid].params = pid, by_param[pid]
    return Experiment(exp_id, status, params, list(trials.values()), source)


# ----------------------------------------------------------------------------- sources
def from_rest(port, host="127.0.0.1", timeout=10):
    profile = nni_io.rest(port, "experiment", host, timeout)
    status = nni_io.rest(port, "check-status", host, timeout).get("status", "UNKNOWN")
    jobs = nni_io.rest(port, "trial-jobs", host, timeout)
    metrics = nni_io.rest(port, "metric-data", host, timeout)
    rows = []
    for j in jobs:
        hypers = [h for h in (_hyper(x) for x in j.get("hyperParameters") or []) if h]
        rows.append((j["trialJobId"], j.get("status"), j.get("sequenceId"), hypers, j.get("logPath")))
    mrows = [(m["trialJobId"], m.get("parameterId"), m.get("type"), m.get("data")) for m in metrics]
    log_dir = Path(profile["logDir"]) / "log" if profile.get("logDir") else None
    return assemble(profile.get("id", "?"), status, profile.get("params", {}), rows, mrows, f"http://{host}:{port} (REST)",
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
    return assemble(exp_id, status, params, [tuple(r) for r in state.values()], metrics, str(db),
                    read_manager_log(nni_io.log_dir_of(db)))


def from_id(exp_id, timeout=10):
    reg = nni_io.registry()
    info = reg.get(exp_id)
    if info is None:
        known = ", ".join(sorted(reg)) or "none"
        raise LookupError(f"experiment {exp_id!r} is not in nnictl's registry ({nni_io.registry_path()}; known: {known})")
    if info.get("status") != "STOPPED" and info.get("port"):
        try:
            exp = from_rest(int(info["port"]), timeout=timeout)
            if exp.id == exp_id:
                return exp
        except (OSError, urllib.error.URLError, ValueError):
            pass  # not answering: read its database
    db = nni_io.database(exp_id, info)
    if not db.is_file():
        raise LookupError(f"experiment {exp_id}: not running and no database at {db}")
    return from_sqlite(db, exp_id, info.get("status", "STOPPED"))


# ----------------------------------------------------------------------------- parameters as flags, ranking
def flatten(params):
    """{"criterion": {"_name": "focal", "focal_gamma": 2}} -> {"criterion": "focal", "focal_gamma": 2};
    Hyperband's {"TRIAL_BUDGET": 9} -> {"epochs": 9}, as train.py reads it (a retry's RETRY_OF is no flag)."""
    from training.flags import trial_flags  # lazy: the flag module imports torch, which listing trials does not need

    flat = {}
    for k, v in trial_flags(params).items():
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
        m = t.metric if is_number(t.metric) else t.best_intermediate_for(exp.maximize)
        return (0 if is_number(t.metric) else 1 if m is not None else 2,
                sign * m if m is not None else 0, STATUS_ORDER.get(t.status, 9), t.sequence)
    return sorted(exp.trials, key=key)


def best_trial(exp):
    order = ranked(exp)
    if order and (is_number(order[0].metric) or order[0].best_intermediate_for(exp.maximize) is not None):
        return order[0]
    return None
