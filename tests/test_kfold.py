"""baseline/kfold.py: K real train.py runs on the tiny demo data, out-of-fold scores, the fold ensemble."""
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from baseline import ensemble, evaluation, kfold
from conftest import ROOT, TINY, read_csv, run_cli, tmpfs, train_env
from core.files import disk_space
from core.metrics import score
from training.checkpoint import load_model



@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir, cache_dir):
    """python baseline/kfold.py --k 3 -- <train.py flags>, as a user runs it."""
    tmp = tmp_path_factory.mktemp("kfold")
    cmd = [sys.executable, str(ROOT / "baseline" / "kfold.py"), "--k", "3", "--model_dir", str(tmp / "runs"), "--name", "cv",
           "--num_workers", "0", "--", "--data_dir", str(demo_dir / "train"), "--eval_dir", str(demo_dir / "eval"),
           "--cache_dir", str(cache_dir), *TINY, "--epochs", "2", "--seed", "7"]
    proc = subprocess.run(cmd, cwd=tmp, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "runs" / "cv", proc.stdout


def test_folds_side_by_side_and_out_of_fold(trained, demo_dir):
    run, stdout = trained
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["fold0", "fold1", "fold2"]
    assert json.loads((run / "kfold.json").read_text())["k"] == 3
    for fold in range(3):
        saved = json.loads((run / f"fold{fold}" / "config.json").read_text())
        assert (saved["kfold"], saved["fold"], saved["seed"], saved["epochs"]) == (3, fold, 7, 2)

    oof = read_csv(run / "oof_soft.csv")
    paths = sorted(str(p) for p in (demo_dir / "train" / "images").glob("*/*.jpg"))
    assert sorted(r["path"] for r in oof) == paths  # every training image exactly once
    folds_of_person = {}
    for r in oof:
        folds_of_person.setdefault(Path(r["path"]).parent.name, set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds_of_person.values())  # split by profile: a person never straddles folds
    assert {f.pop() for f in folds_of_person.values()} == {"0", "1", "2"}

    classes = list(oof[0])[3:]
    probs = np.array([[float(r[c]) for c in classes] for r in oof])
    labels = np.array([int(r["label"]) for r in oof])
    summary = json.loads((run / "kfold_scores.json").read_text())
    assert summary["oof"]["f1"] == pytest.approx(score(labels, probs.argmax(1), 18)["f1"])
    assert f"macro F1 {summary['oof']['f1']:.4f}" in stdout
    for fold in summary["folds"]:
        # each fold's best.pth on its own validation part reproduces what train.py measured there
        best = torch.load(run / f"fold{fold['fold']}" / "best.pth", weights_only=True)
        assert fold["accuracy"] == pytest.approx(best["best_metric"], abs=1e-9) and fold["epoch"] == best["epoch"]


def test_ensemble_submission_is_the_soft_vote_of_the_folds(trained, demo_dir, tmp_path, capsys):
    run, stdout = trained
    assert "soft vote of 3 folds" in stdout
    ids = [r["ImageID"] for r in read_csv(run / "submission.csv")]
    assert ids == [r["ImageID"] for r in read_csv(demo_dir / "eval" / "info.csv")]
    # train.py wrote each fold's own eval submission: ensemble.py over them gives the same soft vote
    folds = [str(run / f"fold{i}" / "submission_soft.csv") for i in range(3)]
    assert ensemble.cli([*folds, "--out", str(tmp_path / "ens")]) == 0
    _, mine, _ = ensemble.read_soft(run / "submission_soft.csv")
    _, theirs, _ = ensemble.read_soft(tmp_path / "ens" / "submission_soft.csv")
    assert np.allclose(mine, theirs, atol=3e-6)
    result = evaluation.evaluate(run / "submission.csv", demo_dir / "eval" / "truth.csv")
    assert result["images"] == len(ids) and 0 <= result["scores"]["f1"] <= 1


def test_reuse_rescores_with_tta_without_training(trained, capsys, tmp_path):
    run = tmp_path / "cv"
    shutil.copytree(trained[0], run)  # a copy, so the other tests keep the plain ensemble
    before = {p: p.stat().st_mtime_ns for p in run.glob("fold*/best.pth")}
    assert kfold.cli(["--reuse", str(run), "--tta", "--num_workers", "0", "--batch_size", "16"]) == 0
    out = capsys.readouterr().out
    assert "=== fold" not in out and "out of fold (3 folds, flip TTA)" in out and "wrote" in out
    assert json.loads((run / "kfold_scores.json").read_text())["tta"] is True
    assert {p: p.stat().st_mtime_ns for p in run.glob("fold*/best.pth")} == before



@pytest.mark.parametrize("args,expected", [
    (["--", "--fold", "1"], "--fold is set by kfold.py"),
    (["--", "--name=x"], "--name is set by kfold.py"),
    (["--k", "1"], "--k 1: need at least 2 folds"),
    (["--eval_dir", "nowhere"], "eval dir nowhere does not exist"),
    (["--reuse", "empty"], "empty: no fold*/best.pth"),
    (["--reuse", "empty", "--", "--epochs", "3"], "--reuse trains nothing"),
    (["--epochs", "3"], "unrecognized arguments: --epochs 3 (train.py flags go after --)"),
])
def test_refusal_is_one_line_and_trains_nothing(args, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(kfold.cli, capsys, "--model_dir", tmp_path / "runs", *args)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kfold.py: error:") and expected in lines[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_failed_fold_stops_with_its_name(tmp_path, demo_dir, cache_dir, capfd):
    # in-process kfold.py, real train.py subprocess: capfd sees both processes' stderr
    code = kfold.cli(["--k", "2", "--model_dir", str(tmp_path / "runs"), "--",
                      "--data_dir", str(demo_dir / "train"), "--cache_dir", str(cache_dir), "--lr", "-1"])
    assert code == 1
    assert capfd.readouterr().err.strip().splitlines() == [
        "train.py: error: --lr -1.0: must be positive",
        f"kfold.py: error: fold 0: train.py exited with code 1 (its message is above); the folds trained so far are in "
        f"{tmp_path / 'runs' / 'kfold'}: `kfold.py --resume {tmp_path / 'runs' / 'kfold'}` trains the rest"]


@pytest.mark.slow
def test_a_disk_that_fills_in_a_fold_is_one_line_and_resume_keeps_the_finished_fold_and_continues_the_other(tmp_path, demo_dir,
                                                                                                             cache_dir):
    """kfold.py on a 16 MB disk that fills while fold 1 trains (its first epoch saved): the write that fails names the disk
    and the file, kfold.py says how to go on, and once space is freed --resume keeps fold 0 as it is, continues fold 1
    from its epoch, then scores and votes."""
    with tmpfs(tmp_path / "disk", "size=16m") as disk:
        run, filler = disk / "cv", disk / "filler"
        cmd = [sys.executable, str(ROOT / "baseline" / "kfold.py"), "--k", "2", "--model_dir", str(disk), "--name", "cv",
               "--num_workers", "0", "--", "--data_dir", str(demo_dir / "train"), "--eval_dir", str(demo_dir / "eval"),
               "--cache_dir", str(cache_dir), *TINY, "--epochs", "3"]
        proc = subprocess.Popen(cmd, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while not (run / "fold1" / "last.pth").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        filler.write_bytes(b"\0" * (disk_space(disk)[0] - 256 * 1024))  # room for a history line, not for a checkpoint
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 1 and re.fullmatch(
            rf"train.py: error: cannot write {run}/fold1/(best|last)\.pth: the disk is full \({disk}: 0\.\d MB free of 16\.0 MB; .*\); "
            rf"{run}/fold1/last\.pth holds epoch 1: continue with --resume {run}/fold1/last\.pth", lines[-2]), err
        assert lines[-1] == (f"kfold.py: error: fold 1: train.py exited with code 1 (its message is above); the folds trained so "
                             f"far are in {run}: `kfold.py --resume {run}` trains the rest, fold 1 from its last.pth")
        assert load_model(run / "fold1" / "last.pth")[1]["epoch"] == 1 and not list(disk.rglob("*.tmp"))
        kept = {p: p.read_bytes() for p in (run / "fold0").glob("*.*")}
        filler.unlink()
        proc = subprocess.run([sys.executable, str(ROOT / "baseline" / "kfold.py"), "--resume", str(run), "--num_workers", "0"],
                              env=train_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"=== fold 0/1: finished, kept ({run / 'fold0'})" in proc.stdout
        assert f"=== fold 1/1: continuing {run / 'fold1' / 'last.pth'}" in proc.stdout
        assert {p: p.read_bytes() for p in kept} == kept
        assert [int(r["epoch"]) for r in read_csv(run / "fold1" / "history.csv")] == [1, 2, 3]
        assert json.loads((run / "kfold_scores.json").read_text())["k"] == 2 and (run / "submission.csv").is_file()


@pytest.mark.slow
def test_folds_rebuilt_from_changed_data_are_refused_and_data_dirs_are_absolute(tmp_path, demo_dir, cache_dir, capsys, monkeypatch):
    """Trained from a relative --data_dir; then scored from another directory (found: config.json holds it absolute),
    then after 6 people joined the data dir (refused by kfold --reuse and by the soup: they would score other images)."""
    shutil.copytree(demo_dir / "train", tmp_path / "data" / "train")
    (tmp_path / "data" / "train" / "train.csv").unlink()  # only checked: its warning about the new people is not the point
    cmd = [sys.executable, str(ROOT / "baseline" / "kfold.py"), "--k", "2", "--model_dir", "runs", "--name", "cv",
           "--num_workers", "0", "--", "--data_dir", "data/train", "--eval_dir", str(demo_dir / "eval"),
           "--cache_dir", str(cache_dir), *TINY, "--epochs", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "runs" / "cv"
    assert json.loads((run / "fold0" / "config.json").read_text())["data_dir"] == str(tmp_path / "data" / "train")
    monkeypatch.chdir(ROOT)
    assert kfold.cli(["--reuse", str(run), "--num_workers", "0"]) == 0
    assert "out-of-fold (168 images)" in capsys.readouterr().out

    people = sorted((tmp_path / "data" / "train" / "images").iterdir())
    for n, person in enumerate(people[:6]):
        shutil.copytree(person, person.with_name(f"{900 + n:06d}_" + person.name.split("_", 1)[1]))
    code, out, err = run_cli(kfold.cli, capsys, "--reuse", run, "--num_workers", "0")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"kfold.py: error: {run / 'fold0'}: its held-out images differ from the ") and \
        f"it held out when it trained ({run / 'fold0' / 'val_soft.csv'}): " in err and " added (e.g. images/" in err and \
        "The data dir changed since; restore it or train the folds again" in err

    from search import soup
    with pytest.raises(ValueError, match=f"{tmp_path / 'runs' / 'cv' / 'fold0'}: its held-out images differ"):
        soup.fold_soup(tmp_path / "runs", ["cv"], 0, torch.device("cpu"), log=lambda line: None)
