"""search/finalize.py: the fold experiment's config, the fetch (local and over a real loopback sshd) with missing or
damaged files, a real search finalized twice, locally and over SSH (the second run trains nothing), and what a
rerun, a second finalize, an interruption or a deadline may not do."""
import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from nni.experiment.config import ExperimentConfig

from bench.searches import run_experiment
from conftest import ROOT, read_csv, run_cli, tmpfs
from core.files import DiskFull, disk_space
from search import finalize
from search.finalists import Finalist, select_finalists
from search.nni_io import Machine
from search.trials import Trial, flag_words, from_id, from_rest
from sshd import free_port, start_sshd
from test_experiment_nni import BIN, local_config, nni_env, nni_experiment
from test_finalists import CMD4, search, trial


# ----------------------------------------------------------------------------- the fold experiment
@pytest.mark.parametrize("name", ["config_local.yml", "config_finetune.yml", "config_remote.yml"])
def test_fold_experiment_is_the_search_config_with_batch_tuner(name, tmp_path):
    jobs = [dict(epochs=0, kfold=2, fold=0), dict(epochs=0, kfold=2, fold=1)]
    config = finalize.fold_experiment_config(ROOT / name, "abc", jobs)
    original = yaml.safe_load((ROOT / name).read_text())
    assert config["tuner"] == {"name": "BatchTuner"} and "assessor" not in config and config["maxTrialNumber"] == 2
    assert config["searchSpace"]["combine_params"]["_value"] == jobs
    assert config["trainingService"] == original["trainingService"] and config["trialCommand"] == original["trialCommand"]
    assert Path(config["trialCodeDirectory"]) == ROOT
    (tmp_path / "key").write_text("placeholder")
    for machine in config["trainingService"].get("machineList", []):  # NNI checks that the key file exists
        machine["sshKeyFile"] = str(tmp_path / "key")
    ExperimentConfig(**config).validate()  # NNI's own schema check


@pytest.mark.parametrize("name, deadline, duration", [("config_local.yml", None, None), ("config_local.yml", 2.5, "150s"),
                                                     ("config_local.yml", 0.01, "1s"), ("no duration", None, None)])
def test_the_fold_experiment_ends_by_the_deadline_not_by_the_searchs_budget(name, deadline, duration, tmp_path):
    """The fold experiment had no maxExperimentDuration at all: NNI submitted folds for as long as they took. The
    search's own (config_local's 30m) is a budget for trials, not for K folds of several finalists (45 minutes)."""
    path = ROOT / name
    if name == "no duration":
        path = tmp_path / "search.yml"
        path.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load((ROOT / "config_local.yml").read_text()).items()
                                        if k != "maxExperimentDuration"}))
    config = finalize.fold_experiment_config(path, "abc", [dict(epochs=0, kfold=2, fold=0)], deadline)
    assert config.get("maxExperimentDuration") == duration
    ExperimentConfig(**config).validate()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_deadline_that_is_no_length_of_time_is_one_line(capsys, tmp_path, value):
    code, out, err = run_cli(finalize.cli, capsys, "--id", "x", "--config", ROOT / "config_local.yml", "--out", tmp_path / "f",
                             "--deadline", value)
    assert code == 1 and err == f"finalize.py: error: --deadline {float(value):g}: give the minutes the fold experiment may run, above 0\n"
    assert not (tmp_path / "f").exists()


def test_the_wait_ends_at_the_deadline_while_folds_still_run(monkeypatch):
    monkeypatch.setattr(finalize.nni_io, "rest", lambda port, path: {"status": "RUNNING"})
    t0 = time.monotonic()
    assert finalize.wait_until_ended(1, until=t0 + 0.3, poll_s=0.1) == "DEADLINE"
    assert 0.3 <= time.monotonic() - t0 < 1
    monkeypatch.setattr(finalize.nni_io, "rest", lambda port, path: {"status": "DONE"})
    assert finalize.wait_until_ended(1, until=time.monotonic() + 60) == "DONE"
    assert finalize.wait_until_ended(1, until=time.monotonic() - 1) == "DEADLINE"  # train_missing decides: nothing missing, no error



# ----------------------------------------------------------------------------- the fetch
def fake_trial_dir(path, run_dir_files):
    path.mkdir(parents=True)
    for name in finalize.FETCHED:
        src = run_dir_files / name
        shutil.copyfile(src, path / name)
    return path


@pytest.fixture(scope="module")
def fold_run(tmp_path_factory, demo_dir, cache_dir):
    """One real train.py --kfold run: the files a fold trial leaves."""
    out = tmp_path_factory.mktemp("foldrun")
    cmd = [sys.executable, str(ROOT / "train.py"), "--data_dir", str(demo_dir / "train"), "--eval_dir", str(demo_dir / "eval"),
           "--cache_dir", str(cache_dir), "--resize", "64", "48", "--batch_size", "32", "--num_workers", "0", "--epochs", "1",
           "--kfold", "2", "--fold", "1", "--model_dir", str(out), "--name", "run"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return out / "run"


@pytest.mark.slow
def test_a_finalist_on_other_age_bands_is_scored_on_the_datas_own_labels(fold_run, tmp_path):
    """--age_bounds changes what a model trains on; its held-out part (val_soft.csv), and so its out-of-fold
    F1, keeps the same images and the data's own labels, so finalize can rank it beside the others."""
    config = json.loads((fold_run / "config.json").read_text())
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(fold_run / "config.json"), "--age_bounds", "30", "40",
           "--model_dir", str(tmp_path), "--name", "moved"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    own, moved = pd.read_csv(fold_run / "val_soft.csv"), pd.read_csv(tmp_path / "moved" / "val_soft.csv")
    assert list(moved["ImageID"]) == list(own["ImageID"]) and list(moved["label"]) == list(own["label"])
    ages = [int(Path(i).parent.name.split("_")[3]) for i in own["ImageID"]]
    assert any(40 <= a < 60 for a in ages), "no held-out person whose band the bounds move"
    assert config["age_bounds"] == [30, 60] and json.loads((tmp_path / "moved" / "config.json").read_text())["age_bounds"] == [30, 40]


FINALISTS = [Finalist("defaults", {})]
FOLD_COMMAND = "python3 train.py"


def command_of(fold_run):
    """A trial command that makes fold_run's config.json the 'defaults' finalist's."""
    config = json.loads((fold_run / "config.json").read_text())
    words = ["python3", "train.py"] + [w for k, v in config.items() if k not in ("epochs", "kfold", "fold")
                                       for w in flag_words({k: v})]
    return shlex.join(words)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["none", "missing best.pth", "truncated best.pth", "val_soft.csv not a CSV"])
def test_local_fetch_checks_every_file_and_leaves_nothing_half_written(damage, fold_run, tmp_path):
    source = fake_trial_dir(tmp_path / "trial", fold_run)
    if damage == "missing best.pth":
        (source / "best.pth").unlink()
    elif damage == "truncated best.pth":
        (source / "best.pth").write_bytes((fold_run / "best.pth").read_bytes()[:3000])
    elif damage == "val_soft.csv not a CSV":
        (source / "val_soft.csv").write_bytes(b"\x00\x01\x02")
    run_dir = tmp_path / "final"
    run_dir.mkdir()
    t = Trial("abcde", "SUCCEEDED", log_path=str(source))
    if damage == "none":
        assert finalize.bring_home(t, FINALISTS, command_of(fold_run), run_dir, []) == ("defaults", 1)
        assert sorted(p.name for p in (run_dir / "defaults" / "fold1").iterdir()) == sorted(finalize.FETCHED)
        assert finalize.folds_home(run_dir, FINALISTS, 2) == {("defaults", 1)}
        return
    with pytest.raises(ValueError) as e:
        finalize.bring_home(t, FINALISTS, command_of(fold_run), run_dir, [])
    assert len(str(e.value).splitlines()) == 1 and ("best.pth" in str(e.value) or "val_soft.csv" in str(e.value)), e.value
    assert list(run_dir.iterdir()) == []  # no fold folder, no temp folder


@pytest.mark.slow
def test_a_fetch_onto_a_full_disk_is_one_line_naming_it_and_leaves_nothing(fold_run, tmp_path):
    """Not "the copy is damaged", not a traceback: the disk that is full, and no half fold or temp folder on it."""
    t = Trial("abcde", "SUCCEEDED", log_path=str(fake_trial_dir(tmp_path / "trial", fold_run)))
    with tmpfs(tmp_path / "disk", "size=64k") as run_dir:
        with pytest.raises(DiskFull) as e:
            finalize.bring_all_home([t], FINALISTS, command_of(fold_run), run_dir, [])
        assert re.fullmatch(rf"cannot write {run_dir}/\.fetch-abcde/\S+: the disk is full \({run_dir}: 0\.0 MB free of 0\.1 MB; "
                            r"No space left on device\)", str(e.value)), e.value
        assert list(run_dir.iterdir()) == []


@pytest.mark.slow
def test_remote_fetch_over_ssh_with_a_missing_file_or_the_server_down(fold_run, tmp_path, capsys):
    with start_sshd(tmp_path / "sshd") as sshd:
        home = Path(pwd.getpwnam(sshd.user).pw_dir)
        remote = home / "nni-experiments" / f"finalize-test-{tmp_path.name}" / "trials" / "xyz12"
        try:
            fake_trial_dir(remote, fold_run)
            machines = [Machine(host=sshd.host, port=sshd.port, user=sshd.user, ssh_key_file=str(sshd.key_file))]
            log_path = f"{sshd.host}:~/{remote.relative_to(home)}"
            t = Trial("xyz12", "SUCCEEDED", log_path=log_path)
            run_dir = tmp_path / "final"
            run_dir.mkdir()
            assert finalize.bring_home(t, FINALISTS, command_of(fold_run), run_dir, machines) == ("defaults", 1)
            for name in finalize.FETCHED:  # byte for byte
                assert (run_dir / "defaults" / "fold1" / name).read_bytes() == (remote / name).read_bytes(), name
            (remote / "val_soft.csv").unlink()
            shutil.rmtree(run_dir / "defaults")
            with pytest.raises(ValueError, match=r"could not copy \(tar: val_soft.csv: .*No such file"):
                finalize.bring_home(t, FINALISTS, command_of(fold_run), run_dir, machines)
            assert list(run_dir.iterdir()) == []

            # the server down once the fold experiment has ended: a fold on another server still comes home, this one
            # is named in one line (and trains again at finalize's next run: it is not home)
            os.killpg(sshd.proc.pid, signal.SIGTERM)
            sshd.proc.wait()
            here = Trial("here1", "SUCCEEDED", log_path=str(fake_trial_dir(tmp_path / "here", fold_run)))
            finalize.bring_all_home([t, here], FINALISTS, command_of(fold_run), run_dir, machines)
            assert capsys.readouterr().err.splitlines() == [
                f"not home: trial xyz12: {log_path.split(':~/')[0]}:{remote.relative_to(home)}: could not copy "
                f"(ssh: connect to host {sshd.host} port {sshd.port}: Connection refused)"]
            assert finalize.folds_home(run_dir, FINALISTS, 2) == {("defaults", 1)}  # here1's
        finally:
            shutil.rmtree(remote.parents[1], ignore_errors=True)


# ----------------------------------------------------------------------------- a real search, finalized
def run_finalize(nni_home, *args, env=None):
    proc = subprocess.run([sys.executable, str(ROOT / "search" / "finalize.py"), *map(str, args)], env=env or nni_env(nni_home),
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def tiny_search(demo_dir, cache_dir, trials=2):
    config = local_config(demo_dir, cache_dir, trials, 1)
    config["trialCommand"] += " --steps 8"  # the folds' standalone length: 8 steps, 2 epochs on the tiny demo
    config.pop("assessor")
    return config


def fetch_with_experiment_py(nni_home, exp_id, out):
    """experiment.py --fetch of the search's best trial -> (its trial, the fetch's stdout)."""
    best = subprocess.run([sys.executable, str(ROOT / "search" / "experiment.py"), "--id", exp_id, "--json"],
                          env=nni_env(nni_home), capture_output=True, text=True, timeout=60)
    assert best.returncode == 0, best.stderr
    best = json.loads(best.stdout)
    cmd = [sys.executable, str(ROOT / "search" / "experiment.py"), "--id", exp_id, "--fetch", best["trial"], "--out", str(out)]
    proc = subprocess.run(cmd, env=nni_env(nni_home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    again = subprocess.run(cmd, env=nni_env(nni_home), capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [f"experiment.py: error: {out} exists: give another --out"]
    return best, proc.stdout


def demo_finalized(demo_dir):
    """What a finalize of a demo search holds out (every training image once) and predicts: check_finalized's expected."""
    return 24 * 7, [r["ImageID"] for r in read_csv(demo_dir / "eval" / "info.csv")]


def digits_finalized(digits):
    return len(read_csv(digits / "train" / "train.csv")), [r["image_id"] for r in read_csv(digits / "eval" / "test.csv")]


def check_finalized(run_dir, k, expected):
    oof_images, eval_ids = expected
    report = json.loads((run_dir / "finalize.json").read_text())
    names = [f["name"] for f in report["finalists"]]
    assert "defaults" in names and report["k"] == k and report["winner"] in names
    for name in names:
        for fold in range(k):
            assert sorted(p.name for p in (run_dir / name / f"fold{fold}").iterdir()) == sorted(finalize.FETCHED)
    assert report["oof_images"] == oof_images and report["winner_oof_f1"] == max(f["oof_f1"] for f in report["finalists"])
    assert [r["ImageID"] for r in read_csv(run_dir / "submission.csv")] == eval_ids
    assert "out-of-fold macro F1" in (run_dir / "report.md").read_text()
    return report


def on_digits(config, digits):
    """A search config's trial command on the digits CSV set, each writer kept whole (the folds too)."""
    words = shlex.split(config["trialCommand"])
    for flag, value in (("--data_dir", digits / "train"), ("--eval_dir", digits / "eval" / "test.csv")):
        words[words.index(flag) + 1] = str(value)
    return dict(config, trialCommand=shlex.join(words + ["--dataset", "CsvDataset", "--group_column", "writer"]))


@pytest.fixture(scope="module")
def local_search(tmp_path_factory, digits_csv, cache_dir, nni_home):
    """One tiny finished search on a CSV data set drawn unlike the demo (labels in a CSV, a writer column for the
    split), finalized by the tests that only read it (each into its own --out) -> (its id, its config, its trials
    by sequence)."""
    config = on_digits(tiny_search(digits_csv, cache_dir), digits_csv)
    config["trialCommand"] += " --reshuffle_val"  # each search trial validates on its own people; the folds must not
    # as the README has it: `python3`, which on a PATH without the venv (below) is the machine's, without torch
    config["trialCommand"] = config["trialCommand"].replace(sys.executable, "python3", 1)
    with nni_experiment(config, tmp_path_factory.mktemp("search"), nni_home) as run:
        run.wait_done(300)
        return run.id, config, sorted(from_rest(run.port).trials, key=lambda t: t.sequence)


def test_local_search_finalized_then_reused(tmp_path, digits_csv, local_search, nni_home):
    exp_id, config, trials = local_search
    (tmp_path / "search.yml").write_text(yaml.safe_dump(config))
    summaries = [json.loads((Path(t.log_path) / "summary.json").read_text()) for t in trials]
    assert [s["split_seed"] for s in summaries] == [42 + t.sequence for t in trials]
    held_out = [set(pd.read_csv(Path(t.log_path) / "val_soft.csv")["ImageID"]) for t in trials]
    assert held_out[0] != held_out[1]
    best, out = fetch_with_experiment_py(nni_home, exp_id, tmp_path / "fetched")
    source = Path(best["output"])
    assert (tmp_path / "fetched" / "best.pth").read_bytes() == (source / "best.pth").read_bytes()
    assert {p.relative_to(source) for p in source.rglob("*") if p.is_file()} == \
        {p.relative_to(tmp_path / "fetched") for p in (tmp_path / "fetched").rglob("*") if p.is_file()}
    bare = dict(nni_env(nni_home), PATH="/usr/bin:/bin")  # the README's finalize line: the venv not activated
    out = run_finalize(nni_home, "--id", exp_id, "--config", tmp_path / "search.yml", "--top", 1, "--k", 2,
                       "--out", tmp_path / "final", "--fold_port", free_port(), env=bare)
    report = check_finalized(tmp_path / "final", 2, digits_finalized(digits_csv))
    assert "fold experiment" in out and len(report["finalists"]) in (1, 2)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "final").rglob("best.pth")}
    out = run_finalize(nni_home, "--id", exp_id, "--config", tmp_path / "search.yml", "--top", 1, "--k", 2,
                       "--out", tmp_path / "final", "--select", "greedy")
    assert "training nothing" in out and "fold experiment" not in out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "final").rglob("best.pth")} == stamps
    assert json.loads((tmp_path / "final" / "finalize.json").read_text())["select"] == "greedy"


@pytest.mark.slow
def test_remote_search_finalized_over_ssh(tmp_path, demo_dir, cache_dir, nni_home):
    config = tiny_search(demo_dir, cache_dir)
    with start_sshd(tmp_path / "sshd") as sshd:
        config["nniManagerIp"] = "127.0.0.1"
        config["trainingService"] = {"platform": "remote", "machineList": [{
            "host": sshd.host, "port": sshd.port, "user": sshd.user, "sshKeyFile": str(sshd.key_file), "pythonPath": str(BIN)}]}
        (tmp_path / "search.yml").write_text(yaml.safe_dump(config))
        home = Path(pwd.getpwnam(sshd.user).pw_dir)
        before = set((home / "nni-experiments").glob("*"))
        try:
            with nni_experiment(config, tmp_path / "search", nni_home) as run:
                run.wait_done(420)
            best, fetched = fetch_with_experiment_py(nni_home, run.id, tmp_path / "fetched")
            source = home / best["output"].split(":~/", 1)[1]
            assert f"from {sshd.host}:~/nni-experiments/" in fetched
            for name in ("best.pth", "summary.json", "tensorboard"):
                assert (tmp_path / "fetched" / name).exists(), name
            assert (tmp_path / "fetched" / "best.pth").read_bytes() == (source / "best.pth").read_bytes()
            out = run_finalize(nni_home, "--id", run.id, "--config", tmp_path / "search.yml", "--top", 1, "--k", 2,
                               "--out", tmp_path / "final", "--fold_port", free_port())
            report = check_finalized(tmp_path / "final", 2, demo_finalized(demo_dir))
            assert all(f"from {sshd.host}:~/nni-experiments/" in line for line in out.splitlines() if line.startswith("home:"))
            out = run_finalize(nni_home, "--id", run.id, "--config", tmp_path / "search.yml", "--top", 1, "--k", 2,
                               "--out", tmp_path / "final")
            assert "training nothing" in out and report["oof_images"] == 168
        finally:  # the search's and the fold experiment's files on the "server"
            for d in set((home / "nni-experiments").glob("*")) - before:
                shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- misuse: plans, folds, the search


def args_of(**kw):
    return finalize.build_parser().parse_args(["--id", "x", "--config", "c.yml", *[w for k, v in kw.items() for w in (f"--{k}", str(v))]])


def planned(tmp_path, command=CMD4, **kw):
    exp = search(trial("t1", 0.9, lr=0.05))
    run_dir = tmp_path / "final"
    run_dir.mkdir(exist_ok=True)
    return run_dir, finalize.plan(run_dir, args_of(**kw), exp, select_finalists(exp, command), command)


@pytest.mark.parametrize("change, message", [
    (dict(command=CMD4.replace("--steps 4", "--steps 8")), "planned with another trial command: top1 --steps 4 -> 8"),
    (dict(command=CMD4.replace("32 24", "40 30")), "top1 --resize [32, 24] -> [40, 30]"),
    (dict(top=2), "was planned for --top 3 (now 2): use another --out"),
    (dict(k=3), "was planned for --k 5 (now 3)"),
    (dict(exp="other"), "was planned for experiment exp12345 (now other)"),
])
def test_a_rerun_that_would_mix_commands_or_searches_is_refused(tmp_path, change, message):
    """A changed --steps/--resize trained the missing fold with the new command and voted it with the old ones;
    an --out of another --id listed the old search's trials; a changed --top was ignored."""
    run_dir, finalists = planned(tmp_path)
    assert [f.name for f in finalists] == ["top1", "defaults"] and finalists[1].config["steps"] == 4
    exp = search(trial("t1", 0.9, lr=0.05))
    exp.id = change.get("exp", exp.id)
    command = change.get("command", CMD4)
    args = args_of(**{k: v for k, v in change.items() if k in ("top", "k")})
    with pytest.raises(ValueError, match=re.escape(message)):
        finalize.plan(run_dir, args, exp, select_finalists(exp, command), command)
    again = finalize.plan(run_dir, args_of(), search(trial("t1", 0.9, lr=0.05)), [], CMD4)  # unchanged: the saved plan
    assert [(f.name, f.config) for f in again] == [(f.name, f.config) for f in finalists]



def test_config_that_is_not_yaml_is_one_line(capsys, tmp_path):
    code, out, err = run_cli(finalize.cli, capsys, "--id", "x", "--config", ROOT / "README.md", "--out", tmp_path / "f")
    assert code == 1 and err.startswith(f"finalize.py: error: --config {ROOT / 'README.md'}: not a readable YAML file ("), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "f").exists()


def test_a_second_finalize_on_one_out_is_refused(tmp_path):
    run_dir = tmp_path / "final"
    run_dir.mkdir()
    with finalize.locked(run_dir):
        code = ("from pathlib import Path; from search import finalize\n"
                "with finalize.locked(Path(%r)): pass") % str(run_dir)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and f"another finalize.py (pid {os.getpid()}) is running there" in proc.stderr
    with finalize.locked(run_dir):  # released when the first ends
        pass


def test_interrupted_finalize_keeps_finished_folds_then_trains_only_the_rest(tmp_path, digits_csv, local_search, nni_home):
    """SIGTERM ended finalize with no message and left its fold experiment running (the rerun: "Port ... is not
    idle"); Ctrl-C printed a traceback and the rerun retrained the folds that had finished. Two runs on one --out
    both trained every fold."""
    exp_id, config, _ = local_search
    config = dict(config, trialCommand=config["trialCommand"].replace("python3", sys.executable, 1))
    (tmp_path / "search.yml").write_text(yaml.safe_dump(config))
    port, out = free_port(), tmp_path / "final"
    cmd = [sys.executable, str(ROOT / "search" / "finalize.py"), "--id", exp_id, "--config", str(tmp_path / "search.yml"),
           "--top", "1", "--k", "2", "--out", str(out)]
    first = subprocess.Popen([*cmd, "--fold_port", str(port)], env=nni_env(nni_home), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if any(t.status == "SUCCEEDED" for t in from_rest(port).trials):
                    break
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(1)
        second = subprocess.run([*cmd, "--fold_port", str(free_port())], env=nni_env(nni_home), cwd=ROOT, text=True,
                                capture_output=True, timeout=120)
        assert second.returncode == 1 and second.stderr.splitlines()[-1] == (
            f"finalize.py: error: {out}: another finalize.py (pid {first.pid}) is running there; wait for it or use another --out")
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    jobs = 2 * len(json.loads((out / "plan.json").read_text())["finalists"])
    home = sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/fold*/summary.json"))
    assert first.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == (f"finalize.py: interrupted: {len(home)} of the {jobs} fold trainings came home to {out}, "
                                       f"the fold experiment is stopped; run finalize again to train only the other {jobs - len(home)}")
    assert 1 <= len(home) < jobs and not list(out.glob(".fetch-*"))
    with socket.socket() as s:  # the fold experiment's manager is gone: nothing listens on its port (our polls may linger)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/fold*/best.pth")}
    rerun = run_finalize(nni_home, *cmd[2:], "--fold_port", port)
    assert f"{jobs - len(home)} trials" in rerun and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    check_finalized(out, 2, digits_finalized(digits_csv))
    # the search's trial command changed since the plan: refused before anything trains, nothing else written
    changed = dict(config, trialCommand=config["trialCommand"].replace("--steps 8", "--steps 4"))
    (tmp_path / "search.yml").write_text(yaml.safe_dump(changed))
    proc = subprocess.run(cmd, env=nni_env(nni_home), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "was planned with another trial command:" in proc.stderr and "--steps 8 -> 4" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


# A train.py that trains the first fold it is given and keeps every later one running until it is killed, so that
# a deadline finds one fold home and one still training, however fast the machine.
# Each fold waits before its second epoch until `filled` is there: the test fills the disk meanwhile
HELD_FOR_THE_DISK = """import os, pathlib, runpy, sys, time
from training import engine
real = engine.train_one_epoch
def train_one_epoch(*args, steps_before=0, **kwargs):
    deadline = time.monotonic() + 120
    if steps_before:
        pathlib.Path({ready!r}).touch()
    while steps_before and not os.path.exists({filled!r}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return real(*args, steps_before=steps_before, **kwargs)
engine.train_one_epoch = train_one_epoch
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_a_fold_on_a_disk_that_fills_fails_in_one_line_and_the_rerun_continues_it(tmp_path, digits_csv, local_search, nni_home,
                                                                                   monkeypatch):
    """finalize's fold experiment on a small disk that fills once the first fold has saved its first epoch: each fold's
    write fails with train.py's one line naming the disk and the file (the fold FAILED, nothing reported), finalize
    names them; once space is freed, its rerun continues the first fold from its epoch and trains the other."""
    exp_id, config, _ = local_search
    monkeypatch.setenv("HOME", str(nni_home))  # nnictl's registry, where from_id looks
    code = tmp_path / "code"
    code.mkdir()
    ready, filled = tmp_path / "ready", tmp_path / "filled"
    (code / "train.py").write_text(HELD_FOR_THE_DISK.format(ready=str(ready), filled=str(filled), train=str(ROOT / "train.py")))
    with tmpfs(tmp_path / "disk", "size=32m") as disk:  # room for the folds of both runs once freed
        config = dict(config, trialCommand=config["trialCommand"].replace("python3", sys.executable, 1), trialCodeDirectory=str(code),
                      experimentWorkingDirectory=str(disk / "nni"))
        (tmp_path / "search.yml").write_text(yaml.safe_dump(config))
        out = tmp_path / "final"
        cmd = [sys.executable, str(ROOT / "search" / "finalize.py"), "--id", exp_id, "--config", str(tmp_path / "search.yml"),
               "--defaults_only", "--k", "2", "--out", str(out), "--fold_port", str(free_port())]
        first = subprocess.Popen(cmd, env=nni_env(nni_home), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 240
            while not ready.exists():
                assert first.poll() is None and time.monotonic() < deadline, first.communicate()
                time.sleep(0.1)
            # room for the logs and the error line (the trial's stderr is a file on this disk), not for a checkpoint
            checkpoint = next(disk.glob("nni/*/environments/*/trials/*/last.pth")).stat().st_size
            (disk / "filler").write_bytes(b"\0" * (disk_space(disk)[0] - checkpoint // 2))
            filled.touch()
            _, err = first.communicate(timeout=300)
        finally:
            if first.poll() is None:
                first.kill()
        trials = from_id((out / "fold_experiments.txt").read_text().split()[0]).trials
        last = err.strip().splitlines()[-1]  # it says where each trial's own error is
        assert first.returncode == 1 and last.startswith("finalize.py: error: 2 fold trainings did not come home (the fold "
                                                         "experiment ended DONE; why: "), err
        assert sorted(last.split("why: ")[1].split("); run")[0].split(", ")) == sorted(f"{t.log_path}/trial.stderr" for t in trials)
        assert sorted(t.status for t in trials) == ["FAILED", "FAILED"] and not any(t.final for t in trials)
        for t in trials:
            line = (Path(t.log_path) / "trial.stderr").read_text().strip().splitlines()[-1]
            assert re.match(rf"train.py: error: cannot write {t.log_path}/(best|last)\.pth: the disk is full \({disk}: ", line), line
        (disk / "filler").unlink()
        rerun = run_finalize(nni_home, *cmd[2:])
        assert "fold experiment on port" in rerun and ": 2 trials" in rerun
        check_finalized(out, 2, digits_finalized(digits_csv))
        again = from_id((out / "fold_experiments.txt").read_text().split()[1]).trials
        said = "".join((Path(t.log_path) / "trial.log").read_text() for t in again)
        held = [t for t in trials if (Path(t.log_path) / "last.pth").is_file()]  # the first fold's epoch 1
        assert len(held) == 1 and f"continuing {Path(held[0].log_path) / 'last.pth'} (this fold's" in said, said
        assert "not continuing an earlier fold: none of the 2 folds that did not finish left a last.pth of these flags here" in said


# Every fold but the first to get there is held in its second epoch (its first saved), until `hang` is removed
FIRST_ONLY = """import os, runpy, sys, time
from training import engine
real = engine.train_one_epoch
def train_one_epoch(*args, steps_before=0, **kwargs):
    if steps_before and os.path.exists({hang!r}):
        try:
            with open({first!r}, "x") as f:
                f.write(str(os.getpid()))
        except FileExistsError:
            if open({first!r}).read() == str(os.getpid()):
                return real(*args, steps_before=steps_before, **kwargs)
            with open({pids!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            time.sleep(3600)
    return real(*args, steps_before=steps_before, **kwargs)
engine.train_one_epoch = train_one_epoch
sys.argv[0] = {train!r}
runpy.run_path({train!r}, run_name="__main__")
"""


def gone(pid, within=60):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return True
        time.sleep(1)
    return False


@pytest.mark.slow
def test_a_deadline_stops_the_folds_keeps_the_finished_ones_and_a_rerun_trains_the_rest(tmp_path, demo_dir, cache_dir, nni_home,
                                                                                       monkeypatch, capsys):
    """The fold experiment had no deadline: finalize waited on a fold that would not end for as long as it ran,
    past a GPU session's 10 minutes per command. Its search is bench.searches.run_experiment's, stopped by a deadline.
    The rerun's fold continues the stopped one's first epoch (it trained everything again)."""
    monkeypatch.setenv("HOME", str(nni_home))  # nnictl's registry, where finalize --id looks
    sleeper = dict(experimentName="sleeper", searchSpace={"x": {"_type": "choice", "_value": [1]}}, trialConcurrency=1,
                   trialCommand=shlex.join([sys.executable, "-c", "import time; time.sleep(600)"]), trialCodeDirectory=str(tmp_path),
                   maxTrialNumber=1, experimentWorkingDirectory=str(tmp_path / "nni"), trainingService={"platform": "local"},
                   tuner={"name": "Random"})
    search_port = free_port()
    exp, _, minutes = run_experiment(sleeper, search_port, tmp_path, deadline_s=10)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(rf"deadline 10 s reached: 0 of [01] trials of {exp.id} finished, 0 epochs reported; the experiment is stopped",
                        line), line
    assert minutes < 1.5 and not any(t.status == "SUCCEEDED" for t in exp.trials)

    shim = tmp_path / "code"
    shim.mkdir()
    hang, pids = tmp_path / "hang", tmp_path / "pids"
    hang.touch()
    (shim / "train.py").write_text(FIRST_ONLY.format(hang=str(hang), first=str(tmp_path / "first"), pids=str(pids),
                                                     train=str(ROOT / "train.py")))
    config = tiny_search(demo_dir, cache_dir, trials=1)
    config["trialCodeDirectory"] = str(shim)
    (tmp_path / "folds.yml").write_text(yaml.safe_dump(config))
    out, port = tmp_path / "final", free_port()
    cmd = [sys.executable, str(ROOT / "search" / "finalize.py"), "--id", exp.id, "--config", str(tmp_path / "folds.yml"),
           "--defaults_only", "--k", "2", "--out", str(out), "--fold_port", str(port)]
    try:
        t0 = time.monotonic()
        proc = subprocess.run([*cmd, "--deadline", "0.5"], env=nni_env(nni_home), cwd=ROOT, capture_output=True, text=True, timeout=400)
        took = time.monotonic() - t0
        assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == (
            f"finalize.py: error: deadline 0.5 min reached: 1 of the 2 fold trainings came home to {out}, the fold experiment "
            f"is stopped; run finalize again to train only the other 1"), proc.stdout[-3000:] + proc.stderr[-3000:]
        assert took < 30 + 90, took  # the deadline, then the stop and one fold brought home
        assert yaml.safe_load((out / "folds.yml").read_text())["maxExperimentDuration"] == "30s"
        home = list(out.glob("defaults/fold*/summary.json"))
        assert len(home) == 1 and not list(out.glob(".fetch-*"))
        with socket.socket() as s:  # the fold experiment's manager is gone
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
        assert all(gone(int(pid)) for pid in pids.read_text().split()), "the fold still training outlived its experiment"
    finally:
        for pid in pids.read_text().split() if pids.is_file() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    stamp = home[0].parent.joinpath("best.pth").stat().st_mtime_ns
    hang.unlink()
    rerun = run_finalize(nni_home, *cmd[2:])
    assert "fold experiment on port" in rerun and ": 1 trials" in rerun
    assert home[0].parent.joinpath("best.pth").stat().st_mtime_ns == stamp
    check_finalized(out, 2, demo_finalized(demo_dir))
    check_stopped_fold_continued(out)


def check_stopped_fold_continued(out):
    """The fold the deadline stopped in its second epoch went on from its first: finalize lost only the epoch it was in."""
    first_id, second_id = (out / "fold_experiments.txt").read_text().split()
    stopped = [Path(t.log_path) for t in from_id(first_id).trials if t.status != "SUCCEEDED"]
    again = Path(from_id(second_id).trials[0].log_path)
    said = (again / "trial.log").read_text()
    assert len(stopped) == 1 and f"continuing {stopped[0] / 'last.pth'} (this fold's, which an earlier fold experiment did not " \
        f"finish)" in said and f"resuming {again} at epoch 2" in said, said
    history = (again / "history.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in history[1:]] == list(range(1, len(history)))
    assert history[1] == (stopped[0] / "history.csv").read_text().splitlines()[1]  # its epoch 1, not trained again


@pytest.mark.parametrize("damage", [b'{"experiment": "exp12345", "finalists": [', b"\xff\xfe", b"[]", b'{"finalists": [{"nom": 1}]}'])
def test_a_damaged_plan_is_one_line_naming_it(tmp_path, damage):
    run_dir, _ = planned(tmp_path)
    (run_dir / "plan.json").write_bytes(damage)
    with pytest.raises(ValueError) as e:
        planned(tmp_path)
    assert str(e.value) == (f"{run_dir / 'plan.json'}: damaged (not the plan finalize wrote there): restore it, or delete it "
                            f"to plan the folds anew")
