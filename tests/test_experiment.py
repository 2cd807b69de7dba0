"""search/experiment.py without NNI: --fetch on hand-made trial dirs (complete, unfinished, damaged, gone,
still running) and every error path of the command as one stderr line with a non-zero exit.
An experiment is nnictl's registry plus an nni.sqlite written here, under a HOME of the test's own."""
import json
import socket
import sqlite3

import pytest

from search import experiment as expmod
from search.trials import Experiment, Trial
from conftest import run_cli

EXP = "abcd1234"
WRITTEN = {"best.pth": b"weights", "last.pth": b"weights", "config.json": b"{}", "history.csv": b"epoch\n1\n",
           "trial.stdout": b"epoch 1\n", "trial.stderr": b""}  # NNI's stderr of a quiet run is empty


def trial_dir(path, summary=True, files=WRITTEN):
    """A trial's output dir as train.py leaves it: its files, tensorboard/, and (a finished run) summary.json last,
    listing what was there."""
    (path / "tensorboard").mkdir(parents=True)
    (path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"event")
    for name, data in files.items():
        (path / name).write_bytes(data)
    if summary:
        (path / "summary.json").write_text(json.dumps({"best": {"value": 0.9}, "files": sorted(p.name for p in path.iterdir())}))
    return path


def experiment(*trials, status="DONE"):
    """trials: (id, status, log_path)."""
    return Experiment(EXP, status, {"trainingService": {"platform": "local"}},
                      [Trial(tid, s, i, log_path=str(p)) for i, (tid, s, p) in enumerate(trials)], "test")


def registered(home, *trials, status="STOPPED"):
    """nnictl's registry and the experiment's nni.sqlite under home, as nnictl leaves them; trials: (id, status, log_path)."""
    root = home / "nni-experiments"
    db = root / EXP / "db" / "nni.sqlite"
    db.parent.mkdir(parents=True)
    (root / ".experiment").write_text(json.dumps({EXP: {"status": status, "logDir": str(root)}}))
    con = sqlite3.connect(db)
    con.executescript("CREATE TABLE ExperimentProfile (params TEXT, revision INTEGER);"
                      "CREATE TABLE TrialJobEvent (timestamp INTEGER, trialJobId TEXT, event TEXT, data TEXT, logPath TEXT,"
                      " sequenceId INTEGER);"
                      "CREATE TABLE MetricData (timestamp INTEGER, trialJobId TEXT, parameterId TEXT, type TEXT,"
                      " sequence INTEGER, data TEXT);")
    con.execute("INSERT INTO ExperimentProfile VALUES (?, 1)",
                (json.dumps({"trialCommand": "python3 train.py", "trainingService": {"platform": "local"}}),))
    for i, (tid, event, log_path) in enumerate(trials):
        con.execute("INSERT INTO TrialJobEvent VALUES (?, ?, ?, ?, ?, ?)", (i, tid, event, None, str(log_path), i))
        con.execute("INSERT INTO MetricData VALUES (?, ?, '0', 'FINAL', 0, ?)", (i, tid, json.dumps(json.dumps(0.5 + i / 10))))
    con.commit()
    con.close()
    return home


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1, message
    return message


def nothing_left(folder):
    """No --out and no temp dir of the fetch in folder."""
    return list(folder.iterdir()) == []


# ----------------------------------------------------------------------------- fetch_trial
def test_a_finished_trial_is_copied_whole(tmp_path, capsys):
    source = trial_dir(tmp_path / "trial")
    out = expmod.fetch_trial(experiment(("t1", "SUCCEEDED", source)), "t1", tmp_path / "home" / "t1")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(p.relative_to(source) for p in source.rglob("*"))
    assert (out / "best.pth").read_bytes() == WRITTEN["best.pth"] and (out / "trial.stderr").read_bytes() == b""
    assert [p.name for p in (tmp_path / "home").iterdir()] == ["t1"]  # no temp dir beside it
    assert capsys.readouterr().out.startswith(f"trial t1 (SUCCEEDED): 8 files from {source} -> {out}: best.pth, ")


@pytest.mark.parametrize("status", ["FAILED", "EARLY_STOPPED", "USER_CANCELED"])
def test_a_run_without_summary_is_refused_and_its_files_named(tmp_path, status):
    source = trial_dir(tmp_path / "trial", summary=False)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError) as e:
        expmod.fetch_trial(experiment(("t1", status, source)), "t1", tmp_path / "runs" / "t1")
    assert one_line_error(e) == (f"trial t1 ({status}): no summary.json, so the run did not finish; its dir has best.pth, "
                                 "config.json, history.csv, last.pth, tensorboard/, trial.stderr, trial.stdout "
                                 "(--partial copies them anyway)")
    assert nothing_left(tmp_path / "runs")


def test_partial_copies_a_run_that_did_not_finish_as_it_is(tmp_path, capsys):
    source = trial_dir(tmp_path / "trial", summary=False, files={"best.pth": b"weights", "history.csv": b"epoch\n"})
    out = expmod.fetch_trial(experiment(("t1", "EARLY_STOPPED", source)), "t1", tmp_path / "t1", partial=True)
    assert sorted(p.name for p in out.iterdir()) == ["best.pth", "history.csv", "tensorboard"]
    assert capsys.readouterr().out.rstrip().endswith("best.pth, history.csv (partial: no summary.json, the run did not finish)")


@pytest.mark.parametrize("damage,message", [
    ("best.pth gone", "missing best.pth"),
    ("best.pth empty", "empty best.pth"),
    ("tensorboard/ gone", "missing tensorboard"),
    ("two gone, one empty", "missing best.pth, last.pth; empty config.json"),
])
@pytest.mark.parametrize("partial", [False, True])  # --partial takes an unfinished run, not a damaged finished one
def test_a_copy_that_lacks_what_summary_lists_is_refused(tmp_path, damage, message, partial):
    source = trial_dir(tmp_path / "trial")
    if damage == "best.pth empty":
        (source / "best.pth").write_bytes(b"")
    elif damage == "tensorboard/ gone":
        (source / "tensorboard" / "events.out.tfevents.1").unlink()
        (source / "tensorboard").rmdir()
    else:
        (source / "best.pth").unlink()
    if damage == "two gone, one empty":
        (source / "last.pth").unlink()
        (source / "config.json").write_bytes(b"")
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError) as e:
        expmod.fetch_trial(experiment(("t1", "SUCCEEDED", source)), "t1", tmp_path / "runs" / "t1", partial=partial)
    assert one_line_error(e) == f"trial t1: the copy of {source} is incomplete ({message}, all listed in its summary.json)"
    assert nothing_left(tmp_path / "runs")


@pytest.mark.parametrize("text", ["{not json", '["a list"]', '{"best": 1}', '{"files": "best.pth"}'])
def test_a_summary_that_is_no_summary_is_refused(tmp_path, text):
    source = trial_dir(tmp_path / "trial")
    (source / "summary.json").write_text(text)
    with pytest.raises(ValueError, match=rf"^trial t1: {source}/summary.json (is not a valid summary|lists no files)"):
        expmod.fetch_trial(experiment(("t1", "SUCCEEDED", source)), "t1", tmp_path / "runs" / "t1")
    assert not (tmp_path / "runs").exists()  # made by the fetch, so removed by it


@pytest.mark.parametrize("status", ["RUNNING", "WAITING", "UNKNOWN"])
def test_a_trial_still_running_is_refused(tmp_path, status):
    source = trial_dir(tmp_path / "trial", summary=False)
    for partial in (False, True):
        with pytest.raises(ValueError) as e:
            expmod.fetch_trial(experiment(("t1", status, source), status="RUNNING"), "t1", tmp_path / "runs" / "t1", partial)
        assert one_line_error(e) == (f"trial t1 is {status}: its files are not all written yet; wait for it to end or stop "
                                     f"the experiment (nnictl stop {EXP}), then fetch it")
    assert not (tmp_path / "runs").exists()


def test_a_stopped_experiments_stale_running_trial_is_judged_by_its_files(tmp_path):
    """Once the experiment is stopped nothing writes there, whatever its database last said."""
    done, cut = trial_dir(tmp_path / "done"), trial_dir(tmp_path / "cut", summary=False)
    exp = experiment(("t1", "RUNNING", done), ("t2", "RUNNING", cut), status="STOPPED")
    assert (expmod.fetch_trial(exp, "t1", tmp_path / "t1") / "summary.json").is_file()
    with pytest.raises(ValueError, match="^trial t2 .RUNNING.: no summary.json, so the run did not finish"):
        expmod.fetch_trial(exp, "t2", tmp_path / "t2")


def test_a_trial_whose_dir_is_gone_writes_nothing(tmp_path):
    with pytest.raises(ValueError) as e:
        expmod.fetch_trial(experiment(("t1", "SUCCEEDED", tmp_path / "gone")), "t1", tmp_path / "runs" / "deep" / "t1")
    assert one_line_error(e) == f"trial t1 (SUCCEEDED): its output dir {tmp_path / 'gone'} is gone, nothing to fetch"
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- the command
@pytest.fixture
def home(tmp_path, monkeypatch):
    """A stopped experiment in nnictl's registry under HOME: a finished trial, one without summary.json,
    one whose copy would lack best.pth, one whose dir is gone."""
    damaged = trial_dir(tmp_path / "trials" / "damaged")
    (damaged / "best.pth").unlink()
    registered(tmp_path / "home", ("tdone", "SUCCEEDED", trial_dir(tmp_path / "trials" / "done")),
               ("tfail", "FAILED", trial_dir(tmp_path / "trials" / "failed", summary=False)),
               ("tdmg", "SUCCEEDED", damaged), ("tgone", "SUCCEEDED", tmp_path / "trials" / "gone"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def closed_port():
    with socket.socket() as s:  # bound and closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_on_the_command_line(home, tmp_path, capsys):
    code, out, err = run_cli(expmod.cli, capsys, "--id", EXP, "--fetch", "tdone", "--out", tmp_path / "got")
    assert (code, err) == (0, "") and out.startswith(f"trial tdone (SUCCEEDED): 8 files from {tmp_path / 'trials' / 'done'} ->")
    code, out, err = run_cli(expmod.cli, capsys, "--id", EXP, "--fetch", "tfail", "--out", tmp_path / "part", "--partial")
    assert code == 0 and "(partial: no summary.json, the run did not finish)" in out and (tmp_path / "part" / "best.pth").is_file()


@pytest.mark.parametrize("args,message", [
    (["--id", "nosuch"], "experiment 'nosuch' is not in nnictl's registry ({home}/nni-experiments/.experiment; known: "
                         f"{EXP})"),
    (["--port", "{port}"], "no NNI experiment answers on 127.0.0.1:{port} ([Errno 111] Connection refused)"),
    (["--id", EXP, "--csv", "{tmp}/afile/trials.csv"], "--csv {tmp}/afile/trials.csv: cannot write it (Not a directory)"),
    (["--id", EXP, "--fetch", "nosuch"], f"experiment {EXP} has no trial 'nosuch' with an output dir (trials: tdone, "
                                         "tfail, tdmg, tgone)"),
    (["--id", EXP, "--fetch", "tdone", "--out", "{tmp}/afile"], "{tmp}/afile exists: give another --out"),
    (["--id", EXP, "--fetch", "tgone", "--out", "{tmp}/got"], "trial tgone (SUCCEEDED): its output dir {tmp}/trials/gone is "
                                                             "gone, nothing to fetch"),
    (["--id", EXP, "--fetch", "tfail", "--out", "{tmp}/got"], "trial tfail (FAILED): no summary.json, so the run did not "
     "finish; its dir has best.pth, config.json, history.csv, last.pth, tensorboard/, trial.stderr, trial.stdout "
     "(--partial copies them anyway)"),
    (["--id", EXP, "--fetch", "tdmg", "--out", "{tmp}/got"], "trial tdmg: the copy of {tmp}/trials/damaged is incomplete "
                                                            "(missing best.pth, all listed in its summary.json)"),
])
def test_every_error_is_one_line_and_exit_1(home, tmp_path, capsys, args, message):
    (tmp_path / "afile").write_text("a file, not a dir")
    fill = dict(home=home, tmp=tmp_path, port=closed_port())
    code, out, err = run_cli(expmod.cli, capsys, *(a.format(**fill) for a in args))
    assert (code, out, err) == (1, "", f"experiment.py: error: {message.format(**fill)}\n")
    assert not (tmp_path / "got").exists()


def test_a_running_trial_is_refused_on_the_command_line(tmp_path, monkeypatch, capsys):
    registered(tmp_path / "home", ("trun", "RUNNING", trial_dir(tmp_path / "trial", summary=False)), status="RUNNING")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, out, err = run_cli(expmod.cli, capsys, "--id", EXP, "--fetch", "trun", "--out", tmp_path / "got")
    assert (code, out) == (1, "") and err == (f"experiment.py: error: trial trun is RUNNING: its files are not all written "
                                              f"yet; wait for it to end or stop the experiment (nnictl stop {EXP}), then fetch it\n")
    assert not (tmp_path / "got").exists()


@pytest.mark.parametrize("args,message", [
    ([], "one of the arguments --port --id is required"),
    (["--port", "abc"], "argument --port: abc is not a TCP port (1..65535)"),
    (["--port", "70000"], "argument --port: 70000 is not a TCP port (1..65535)"),
    (["--id", EXP, "--out", "x"], "--out and --partial go with --fetch"),
    (["--id", EXP, "--fetch", "t1", "--json"], "--fetch prints no table: leave out --csv and --json"),
])
def test_a_usage_error_is_one_line_and_exit_2(capsys, args, message):
    assert run_cli(expmod.cli, capsys, *args) == (2, "", f"experiment.py: error: {message}\n")


def test_the_table_and_its_csv(home, tmp_path, capsys):
    code, out, err = run_cli(expmod.cli, capsys, "--id", EXP, "--csv", tmp_path / "trials.csv")
    assert code == 0 and "best trial tgone" in out and err == f"wrote {tmp_path / 'trials.csv'}\n"
    assert len((tmp_path / "trials.csv").read_text().splitlines()) == 5


def test_a_resumed_experiment_is_told_by_its_manager_log(tmp_path):
    """--retry-failed gives no parameter id to a retry in a resumed experiment: NNI 3.0's resumed dispatcher never
    issued the failed trial's, and fails (KeyError) on one below the ids it recovered."""
    (tmp_path / "log").mkdir()
    log = tmp_path / "log" / "nnimanager.log"
    log.write_text("[2026-12-07 18:06:24] INFO (NNIManager) Starting experiment: abc\n")
    assert not expmod.was_resumed({"logDir": str(tmp_path)})
    log.write_text(log.read_text() + "[2026-12-07 18:06:35] INFO (NNIManager) Resuming experiment: abc\n")
    assert expmod.was_resumed({"logDir": str(tmp_path)})
    assert not expmod.was_resumed({}) and not expmod.was_resumed({"logDir": str(tmp_path / "elsewhere")})
