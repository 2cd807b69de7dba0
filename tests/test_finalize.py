"""baseline/finalize.py: finalist selection, the fold dispatch, greedy ensemble selection on crafted
probabilities, the fetch (local and over a real loopback sshd) with missing or damaged files, and a
real search finalized twice, locally and over SSH (the second run trains nothing)."""
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

import numpy as np
import pandas as pd
import pytest
import yaml
from nni.experiment.config import ExperimentConfig

from baseline import experiment as expmod
from baseline import finalize
from baseline.preflight import Machine
from conftest import ROOT, read_csv, run_cli
from core.labels import mask_class_names
from core.runs import write_submission, write_val_soft
from sshd import free_port, start_sshd
from test_experiment_nni import BIN, local_config, nni_env, nni_experiment
from training import flags

COMMAND = "python3 train.py --epochs 20 --resize 64 48"


def trial(tid, metric, **params):
    return expmod.Trial(tid, "SUCCEEDED", sequence=int(tid[-1]), params=params, final={"default": metric})


def search(*trials):
    return expmod.Experiment("exp12345", "DONE", {}, list(trials), "test")


# ----------------------------------------------------------------------------- finalists and jobs
def test_finalists_are_distinct_configurations_by_metric_plus_the_defaults():
    exp = search(trial("t1", 0.80, lr=0.01), trial("t2", 0.90, lr=0.05, criterion={"_name": "focal", "focal_gamma": 2.0}),
                 trial("t3", 0.85, lr=0.01, TRIAL_BUDGET=6),  # t1's configuration, longer: not another finalist
                 trial("t4", 0.70, lr=0.2), expmod.Trial("t5", "FAILED", 5, {"lr": 0.3}))
    finalists = finalize.select_finalists(exp, COMMAND, top=3)
    assert [(f.name, f.trial, f.search_metric) for f in finalists] == [
        ("top1", "t2", 0.90), ("top2", "t3", 0.85), ("top3", "t4", 0.70), ("defaults", "", None)]
    assert finalists[0].params == {"lr": 0.05, "criterion": "focal", "focal_gamma": 2.0}
    assert finalists[1].params == {"lr": 0.01}  # its TRIAL_BUDGET (--epochs) is not part of it
    assert finalize.select_finalists(exp, COMMAND, top=1)[1].name == "defaults"


def test_defaults_not_added_twice():
    default_lr = flags.defaults()["lr"]
    exp = search(trial("t1", 0.9, lr=default_lr), trial("t2", 0.8, lr=0.05))
    finalists = finalize.select_finalists(exp, COMMAND, top=2)
    assert [(f.name, f.trial) for f in finalists] == [("defaults", "t1"), ("top2", "t2")]  # the defaults' trial, named so


def test_fold_jobs_train_every_missing_fold_at_the_standalone_length():
    finalists = [finalize.Finalist("top1", {"lr": 0.05}), finalize.Finalist("defaults", {})]
    jobs = finalize.fold_jobs(finalists, 3, done={("top1", 1)})
    assert jobs == [dict(lr=0.05, epochs=0, kfold=3, fold=0), dict(lr=0.05, epochs=0, kfold=3, fold=2),
                    dict(epochs=0, kfold=3, fold=0), dict(epochs=0, kfold=3, fold=1), dict(epochs=0, kfold=3, fold=2)]
    parser = flags.build_parser()
    for job in jobs:  # every job is a valid set of train.py parameters over the trial command
        args = flags.apply_params(parser, parser.parse_args(shlex.split(COMMAND)[2:]), job, "job")
        assert args.epochs == 0 and args.kfold == 3


@pytest.mark.parametrize("name", ["config_local.yml", "config_remote.yml"])
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


# ----------------------------------------------------------------------------- ensemble selection
def test_greedy_selection_finds_complementary_members():
    labels = np.array([0, 0, 1, 1, 2, 2])
    sure0, sure1, sure2 = [0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]
    a = np.array([sure0, sure0, sure1, sure1, [0.4, 0.3, 0.3], [0.4, 0.3, 0.3]])  # right on 0 and 1, unsure and wrong on 2
    b = np.array([[0.3, 0.4, 0.3], [0.3, 0.4, 0.3], sure1, sure1, sure2, sure2])  # unsure and wrong on 0, right on 1 and 2
    c = np.full((6, 3), 1 / 3)                 # says nothing
    weights, f1 = finalize.greedy_selection([c, a, b], labels)
    assert finalize.macro_f1(labels, a) < 1 and finalize.macro_f1(labels, b) < 1
    assert f1 == pytest.approx(1.0) and weights[0] == 0 and weights[1] > 0 and weights[2] > 0
    assert weights.sum() == pytest.approx(1)
    assert f1 == pytest.approx(finalize.macro_f1(labels, weights[1] * a + weights[2] * b))


def test_greedy_selection_of_one_good_member_is_that_member():
    labels = np.array([0, 1, 2])
    good, bad = np.eye(3), np.eye(3)[[1, 2, 0]]
    weights, f1 = finalize.greedy_selection([bad, good], labels)
    assert list(weights) == [0, 1] and f1 == 1.0


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


FINALISTS = [finalize.Finalist("defaults", {})]
FOLD_COMMAND = "python3 train.py"


def command_of(fold_run):
    """A trial command that makes fold_run's config.json the 'defaults' finalist's."""
    config = json.loads((fold_run / "config.json").read_text())
    words = ["python3", "train.py"] + [w for k, v in config.items() if k not in ("epochs", "kfold", "fold")
                                       for w in expmod.flag_words({k: v})]
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
    t = expmod.Trial("abcde", "SUCCEEDED", log_path=str(source))
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
def test_remote_fetch_over_ssh_with_a_missing_file(fold_run, tmp_path):
    with start_sshd(tmp_path / "sshd") as sshd:
        home = Path(pwd.getpwnam(sshd.user).pw_dir)
        remote = home / "nni-experiments" / f"finalize-test-{tmp_path.name}" / "trials" / "xyz12"
        try:
            fake_trial_dir(remote, fold_run)
            machines = [Machine(host=sshd.host, port=sshd.port, user=sshd.user, ssh_key_file=str(sshd.key_file))]
            log_path = f"{sshd.host}:~/{remote.relative_to(home)}"
            t = expmod.Trial("xyz12", "SUCCEEDED", log_path=log_path)
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
        finally:
            shutil.rmtree(remote.parents[1], ignore_errors=True)


# ----------------------------------------------------------------------------- a real search, finalized
def run_finalize(nni_home, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "baseline" / "finalize.py"), *map(str, args)], env=nni_env(nni_home),
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
    best = subprocess.run([sys.executable, str(ROOT / "baseline" / "experiment.py"), "--id", exp_id, "--json"],
                          env=nni_env(nni_home), capture_output=True, text=True, timeout=60)
    assert best.returncode == 0, best.stderr
    best = json.loads(best.stdout)
    cmd = [sys.executable, str(ROOT / "baseline" / "experiment.py"), "--id", exp_id, "--fetch", best["trial"], "--out", str(out)]
    proc = subprocess.run(cmd, env=nni_env(nni_home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    again = subprocess.run(cmd, env=nni_env(nni_home), capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [f"experiment.py: error: {out} exists: give another --out"]
    return best, proc.stdout


def check_finalized(run_dir, k, demo_dir):
    report = json.loads((run_dir / "finalize.json").read_text())
    names = [f["name"] for f in report["finalists"]]
    assert "defaults" in names and report["k"] == k and report["winner"] in names
    for name in names:
        for fold in range(k):
            assert sorted(p.name for p in (run_dir / name / f"fold{fold}").iterdir()) == sorted(finalize.FETCHED)
    assert report["oof_images"] == 24 * 7 and report["winner_oof_f1"] == max(f["oof_f1"] for f in report["finalists"])
    submission = read_csv(run_dir / "submission.csv")
    assert [r["ImageID"] for r in submission] == [r["ImageID"] for r in read_csv(demo_dir / "eval" / "info.csv")]
    assert "out-of-fold macro F1" in (run_dir / "report.md").read_text()
    return report


@pytest.mark.slow
def test_local_search_finalized_then_reused(tmp_path, demo_dir, cache_dir, nni_home):
    config = tiny_search(demo_dir, cache_dir)
    config["trialCommand"] += " --reshuffle_val"  # each search trial validates on its own people; the folds must not
    (tmp_path / "search.yml").write_text(yaml.safe_dump(config))
    with nni_experiment(config, tmp_path / "search", nni_home) as run:
        run.wait_done(300)
        exp_id = run.id
        trials = sorted(expmod.from_rest(run.port).trials, key=lambda t: t.sequence)
    summaries = [json.loads((Path(t.log_path) / "summary.json").read_text()) for t in trials]
    assert [s["split_seed"] for s in summaries] == [42 + t.sequence for t in trials]
    held_out = [set(pd.read_csv(Path(t.log_path) / "val_soft.csv")["ImageID"]) for t in trials]
    assert held_out[0] != held_out[1] and len(held_out[0]) == len(held_out[1])
    best, out = fetch_with_experiment_py(nni_home, exp_id, tmp_path / "fetched")
    source = Path(best["output"])
    assert (tmp_path / "fetched" / "best.pth").read_bytes() == (source / "best.pth").read_bytes()
    assert {p.relative_to(source) for p in source.rglob("*") if p.is_file()} == \
        {p.relative_to(tmp_path / "fetched") for p in (tmp_path / "fetched").rglob("*") if p.is_file()}
    out = run_finalize(nni_home, "--id", exp_id, "--config", tmp_path / "search.yml", "--top", 1, "--k", 2,
                       "--out", tmp_path / "final", "--fold_port", free_port())
    report = check_finalized(tmp_path / "final", 2, demo_dir)
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
            report = check_finalized(tmp_path / "final", 2, demo_dir)
            assert all(f"from {sshd.host}:~/nni-experiments/" in line for line in out.splitlines() if line.startswith("home:"))
            out = run_finalize(nni_home, "--id", run.id, "--config", tmp_path / "search.yml", "--top", 1, "--k", 2,
                               "--out", tmp_path / "final")
            assert "training nothing" in out and report["oof_images"] == 168
        finally:  # the search's and the fold experiment's files on the "server"
            for d in set((home / "nni-experiments").glob("*")) - before:
                shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- misuse: plans, folds, the search
CMD4 = "python3 train.py --steps 4 --resize 32 24"


def args_of(**kw):
    return finalize.build_parser().parse_args(["--id", "x", "--config", "c.yml", *[w for k, v in kw.items() for w in (f"--{k}", str(v))]])


def planned(tmp_path, command=CMD4, **kw):
    exp = search(trial("t1", 0.9, lr=0.05))
    run_dir = tmp_path / "final"
    run_dir.mkdir(exist_ok=True)
    return run_dir, finalize.plan(run_dir, args_of(**kw), exp, finalize.select_finalists(exp, command), command)


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
        finalize.plan(run_dir, args, exp, finalize.select_finalists(exp, command), command)
    again = finalize.plan(run_dir, args_of(), search(trial("t1", 0.9, lr=0.05)), [], CMD4)  # unchanged: the saved plan
    assert [(f.name, f.config) for f in again] == [(f.name, f.config) for f in finalists]


@pytest.mark.parametrize("statuses", [[], ["RUNNING", "WAITING"], ["FAILED", "FAILED", "FAILED"]])
def test_a_search_with_no_finished_trial_is_refused(statuses):
    """It was finalized as the defaults alone, without a word."""
    exp = search(*[expmod.Trial(f"t{i}", s, i, {"lr": 0.01 * (i + 1)}) for i, s in enumerate(statuses)])
    with pytest.raises(ValueError, match=f"nothing to finalize yet: experiment exp12345 has {len(statuses)} trials, "
                                         "none reported a final result .*--defaults_only"):
        finalize.select_finalists(exp, COMMAND)
    only = finalize.select_finalists(exp, COMMAND, defaults_only=True)
    assert [(f.name, f.params) for f in only] == [("defaults", {})]


# Two folds of 4 held-out images each, 3 eval images: the files a fold run leaves, written by hand.
CLASSES18 = mask_class_names()


def fake_fold(folder, config, held_out, eval_ids, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(config, epochs=2, kfold=2, fold=int(folder.name[-1]))))
    (folder / "summary.json").write_text(json.dumps(dict(train_images=4, val_images=len(held_out), files=[])))
    write_val_soft(folder / "val_soft.csv", held_out, rng.integers(0, 18, len(held_out)), rng.dirichlet(np.ones(18), len(held_out)), CLASSES18)
    probs = rng.dirichlet(np.ones(18), len(eval_ids))
    write_submission(folder, eval_ids, probs, CLASSES18)
    return probs


@pytest.fixture
def fake_run(tmp_path):
    run_dir, finalists = planned(tmp_path)
    folds = [["a.jpg", "b.jpg", "c.jpg", "d.jpg"], ["e.jpg", "f.jpg", "g.jpg", "h.jpg"]]
    for f in finalists:
        for fold in range(2):
            fake_fold(run_dir / f.name / f"fold{fold}", f.config, folds[fold], ["x.jpg", "y.jpg", "z.jpg"], fold)
    return run_dir, finalists


def test_fake_folds_rank(fake_run):
    run_dir, finalists = fake_run
    report = finalize.rank_and_vote(run_dir, finalists, 2, "winner")
    assert report["oof_images"] == 8 and report["eval_images"] == 3


def damage(run_dir, how):
    fold = run_dir / "defaults" / "fold0"
    if how == "truncated val_soft.csv":
        lines = (fold / "val_soft.csv").read_text().splitlines()
        (fold / "val_soft.csv").write_text("\n".join(lines[:3]) + "\n")
    elif how == "val_soft.csv deleted":
        (fold / "val_soft.csv").unlink()
    elif how == "empty submission_soft.csv":
        (fold / "submission_soft.csv").write_text("")
    elif how == "eval columns reordered":  # harmless: read by name
        table = pd.read_csv(fold / "submission_soft.csv")
        table[["ImageID", *CLASSES18[::-1]]].to_csv(fold / "submission_soft.csv", index=False)
        return None
    elif how == "another command":
        config = json.loads((fold / "config.json").read_text())
        (fold / "config.json").write_text(json.dumps(dict(config, steps=8)))
    elif how == "a fold's images held out twice":
        shutil.copyfile(run_dir / "defaults" / "fold0" / "val_soft.csv", run_dir / "defaults" / "fold1" / "val_soft.csv")
        return run_dir / "defaults" / "fold1"
    return fold


@pytest.mark.parametrize("how, message", [
    ("truncated val_soft.csv", "val_soft.csv: 2 held-out images, its run held out 4"),   # scored over 77 of 140, silently
    ("val_soft.csv deleted", "val_soft.csv: missing (delete "),                          # FileNotFoundError
    ("empty submission_soft.csv", "submission_soft.csv: not a readable CSV (No columns to parse from file)"),
    ("another command", "trained with another command than defaults's plan (--steps 4 -> 8)"),
    ("a fold's images held out twice", "is held out in fold0 too"),
    ("eval columns reordered", None),
])
def test_damaged_or_foreign_folds_are_named_not_voted(fake_run, how, message):
    """'top1' was blamed for a truncated defaults/fold0/val_soft.csv ("its folds cover other images")."""
    run_dir, finalists = fake_run
    before = finalize.rank_and_vote(run_dir, finalists, 2, "winner")
    fold = damage(run_dir, how)
    if message is None:
        after = finalize.rank_and_vote(run_dir, finalists, 2, "winner")
        assert after["finalists"] == before["finalists"]
        return
    with pytest.raises(ValueError) as e:
        finalize.rank_and_vote(run_dir, finalists, 2, "winner")
    assert str(e.value).startswith(str(fold)) and message in str(e.value) and len(str(e.value).splitlines()) == 1, e.value


def test_config_that_is_not_yaml_is_one_line(capsys, tmp_path):
    code, out, err = run_cli(finalize.cli, capsys, "--id", "x", "--config", ROOT / "README.md", "--out", tmp_path / "f")
    assert code == 1 and err.startswith(f"finalize.py: error: --config {ROOT / 'README.md'}: not a readable YAML file ("), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "f").exists()


def test_a_second_finalize_on_one_out_is_refused(tmp_path):
    run_dir = tmp_path / "final"
    run_dir.mkdir()
    with finalize.locked(run_dir):
        code = ("import sys; sys.path.insert(0, %r); from pathlib import Path; from baseline import finalize\n"
                "with finalize.locked(Path(%r)): pass") % (str(ROOT), str(run_dir))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and f"another finalize.py (pid {os.getpid()}) is running there" in proc.stderr
    with finalize.locked(run_dir):  # released when the first ends
        pass


@pytest.mark.slow
def test_interrupted_finalize_keeps_finished_folds_then_trains_only_the_rest(tmp_path, demo_dir, cache_dir, nni_home):
    """SIGTERM ended finalize with no message and left its fold experiment running (the rerun: "Port ... is not
    idle"); Ctrl-C printed a traceback and the rerun retrained the folds that had finished. Two runs on one --out
    both trained every fold."""
    config = tiny_search(demo_dir, cache_dir)
    (tmp_path / "search.yml").write_text(yaml.safe_dump(config))
    with nni_experiment(config, tmp_path / "search", nni_home) as run:
        run.wait_done(300)
        exp_id = run.id
    port, out = free_port(), tmp_path / "final"
    cmd = [sys.executable, str(ROOT / "baseline" / "finalize.py"), "--id", exp_id, "--config", str(tmp_path / "search.yml"),
           "--top", "1", "--k", "2", "--out", str(out)]
    first = subprocess.Popen([*cmd, "--fold_port", str(port)], env=nni_env(nni_home), cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if any(t.status == "SUCCEEDED" for t in expmod.from_rest(port).trials):
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
    check_finalized(out, 2, demo_dir)
    # the search's trial command changed since the plan: refused before anything trains, nothing else written
    changed = dict(config, trialCommand=config["trialCommand"].replace("--steps 8", "--steps 4"))
    (tmp_path / "search.yml").write_text(yaml.safe_dump(changed))
    proc = subprocess.run(cmd, env=nni_env(nni_home), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "was planned with another trial command:" in proc.stderr and "--steps 8 -> 4" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
