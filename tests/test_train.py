import json
import math
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import ROOT, TINY, crafted_checkpoint, read_csv, run_cli, train_env
from model import create_model
from training import flags


def check_summary_and_val_soft(run, stdout, demo_dir):
    """summary.json (what the tools read instead of the printed lines) and val_soft.csv -> the summary."""
    summary = json.loads((run / "summary.json").read_text())  # what the tools read instead of the printed lines
    first_step = float(re.search(r"first step ([0-9.]+)s", stdout).group(1))
    assert summary["run_dir"] == str(run) and summary["epochs"] == 2 and summary["first_step_s"] == pytest.approx(first_step, abs=0.06)
    startup = summary["startup"]  # where the time before training went, in the order it passes
    assert 0 < startup["imports_s"] <= startup["data_s"] <= startup["model_s"] <= startup["first_step_s"] == summary["first_step_s"]
    assert summary["wall_s"] >= startup["model_s"] + sum(float(r["seconds"]) for r in read_csv(run / "history.csv"))
    assert set(summary["files"]) == {"config.json", "best.pth", "last.pth", "history.csv", "submission.csv", "submission_soft.csv",
                                     "val_soft.csv", "tensorboard"}
    val_soft = read_csv(run / "val_soft.csv")  # the best epoch's validation predictions, by image under the data dir
    assert len(val_soft) == summary["val_images"] and list(val_soft[0])[:2] == ["ImageID", "label"]
    assert all((demo_dir / "train" / r["ImageID"]).is_file() for r in val_soft)
    val_probs = np.array([[float(r[c]) for c in list(val_soft[0])[2:]] for r in val_soft])
    val_labels = np.array([int(r["label"]) for r in val_soft])
    assert np.allclose(val_probs.sum(1), 1, atol=1e-3) and len(val_probs[0]) == 18
    assert summary["best"]["val_accuracy"] == pytest.approx(float((val_probs.argmax(1) == val_labels).mean()))
    assert (summary["train_images"], summary["eval_images"], summary["classes"]) == (len(read_csv(demo_dir / "train" / "train.csv")) * 7
                                                                                     - summary["val_images"], 14, 18)
    return summary


@pytest.mark.slow
def test_end_to_end_writes_every_output(run_train, tmp_path, demo_dir):
    proc = run_train("--epochs", "2")
    run = tmp_path / "runs" / "exp"
    assert f"run dir {run}" in proc.stdout
    for name in ("config.json", "best.pth", "last.pth", "history.csv", "submission.csv", "submission_soft.csv", "summary.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp"))
    summary = check_summary_and_val_soft(run, proc.stdout, demo_dir)

    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 2 and config["resize"] == [64, 48] and "config" not in config

    history = read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert {"val_accuracy", "val_f1", "val_mask_f1", "val_gender_f1", "val_age_f1", "val_loss", "lr"} <= set(history[0])

    best = torch.load(run / "best.pth", weights_only=True)
    assert best["model"] == "BaseModel" and best["classification"] == "single" and len(best["classes"]) == 18
    assert best["resize"] == [64, 48] and len(best["mean"]) == 3 and best["metric"] == "accuracy"
    assert best["best_metric"] == max(float(r["val_accuracy"]) for r in history)
    assert summary["best"] == dict(metric="accuracy", value=best["best_metric"], epoch=best["epoch"],
                                   val_accuracy=float(history[best["epoch"] - 1]["val_accuracy"]),
                                   val_f1=pytest.approx(float(history[best["epoch"] - 1]["val_f1"]), rel=1e-6))
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["epoch"] == 2 and "optimizer" in last and len(last["history"]) == 2

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"val/accuracy", "val/f1", "val/loss", "train/loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("val/f1")] == [1, 2]
    assert np.isclose(events.Scalars("val/accuracy")[-1].value, float(history[-1]["val_accuracy"]))
    assert {"val/confusion_matrix", "val/predictions"} <= set(tags["images"])

    info = read_csv(demo_dir / "eval" / "info.csv")
    submission = read_csv(run / "submission.csv")
    assert [r["ImageID"] for r in submission] == [r["ImageID"] for r in info]
    assert all(0 <= int(r["ans"]) < 18 for r in submission)
    soft = read_csv(run / "submission_soft.csv")
    assert list(soft[0]) == ["ImageID"] + best["classes"]
    for row_soft, row in zip(soft, submission):
        probs = [float(row_soft[c]) for c in best["classes"]]
        assert abs(sum(probs) - 1) < 1e-3 and int(np.argmax(probs)) == int(row["ans"])

    run_train("--epochs", "1", "--metric", "f1", "--classification", "multi_head", "--criterion", "focal")
    second = torch.load(tmp_path / "runs" / "exp2" / "best.pth", weights_only=True)
    assert second["classification"] == "multi_head" and second["metric"] == "f1"
    # the run's config.json re-runs as it is
    run_train("--config", run / "config.json", "--epochs", "1", data=False)
    assert json.loads((tmp_path / "runs" / "exp3" / "config.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_folder_layout_submission_holds_class_names(run_train, tmp_path):
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "10": (20, 20, 220), "2": (230, 230, 30)}
    rng = np.random.default_rng(0)
    for name, colour in colours.items():
        for i in range(6):
            noise = rng.integers(-20, 20, (32, 32, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(tmp_path / f"{name}_{i}.png")
            (tmp_path / "flowers" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / f"{name}_{i}.png").rename(tmp_path / "flowers" / name / f"{i}.png")
    (tmp_path / "test" / "nested").mkdir(parents=True)
    Image.new("RGB", (32, 32), colours["red"]).save(tmp_path / "test" / "a.png")
    Image.new("RGB", (32, 32), colours["10"]).save(tmp_path / "test" / "nested" / "b.png")
    run_train("--dataset", "ImageFolderDataset", "--data_dir", tmp_path / "flowers", "--eval_dir", tmp_path / "test",
              "--epochs", "2", "--resize", "32", "32", "--val_ratio", "0.5", data=False)
    run = tmp_path / "runs" / "exp"
    assert torch.load(run / "best.pth", weights_only=True)["classes"] == ["2", "10", "green", "red"]
    submission = read_csv(run / "submission.csv")
    assert [r["ImageID"] for r in submission] == ["a.png", "nested/b.png"]
    assert all(r["ans"] in colours for r in submission)
    assert list(read_csv(run / "submission_soft.csv")[0]) == ["ImageID", "2", "10", "green", "red"]


def start_train(demo_dir, cache_dir, tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "train.py"), "--data_dir", str(demo_dir / "train"), "--model_dir", str(tmp_path / "runs"),
           "--cache_dir", str(cache_dir), *TINY, *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epochs(path, epochs, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and len(read_csv(path)) >= epochs:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no {epochs} epochs in {path} after {timeout}s")


@pytest.mark.slow
def test_resume_after_kill(demo_dir, cache_dir, tmp_path, run_train):
    proc = start_train(demo_dir, cache_dir, tmp_path, "--epochs", "40")
    run = tmp_path / "runs" / "exp"
    wait_for_epochs(run / "history.csv", 2, proc)
    proc.kill()
    proc.wait()
    done = torch.load(run / "last.pth", weights_only=True)["epoch"]
    assert done >= 2
    proc = run_train("--resume", run / "last.pth", "--epochs", str(done + 2), data=False)
    assert f"resuming {run} at epoch {done + 1}" in proc.stdout
    assert [int(r["epoch"]) for r in read_csv(run / "history.csv")] == list(range(1, done + 3))
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == done + 2
    assert not (tmp_path / "runs" / "exp2").exists()


@pytest.mark.slow
def test_sigterm_ends_run_promptly_keeping_last(demo_dir, cache_dir, tmp_path):
    proc = start_train(demo_dir, cache_dir, tmp_path, "--epochs", "200")
    run = tmp_path / "runs" / "exp"
    wait_for_epochs(run / "history.csv", 1, proc)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert time.time() - sent < 10
    assert proc.returncode == -signal.SIGTERM  # ends by the signal: NNI tells a cancel from a failure by it
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] >= 1


def corrupt_copy(demo_dir, tmp_path):
    import shutil
    shutil.copytree(demo_dir / "train", tmp_path / "bad")
    victim = sorted((tmp_path / "bad" / "images").glob("*/mask2.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:200])
    return tmp_path / "bad", victim.parent.name + "/mask2.jpg"


def renamed_copy(demo_dir, tmp_path, new_name):
    import shutil
    shutil.copytree(demo_dir / "train", tmp_path / "bad")
    first = sorted((tmp_path / "bad" / "images").iterdir())[0]
    first.rename(first.with_name(new_name))
    return tmp_path / "bad", new_name


BAD_INPUTS = {
    "missing data dir": (lambda d, t: (["--data_dir", t / "nowhere"], "does not exist")),
    "layer decay without timm": (lambda d, t: (["--layer_decay", "0.8"], "--layer_decay needs a timm backbone")),
    "ema out of range": (lambda d, t: (["--ema", "1"], "--ema")),
    "empty data dir": (lambda d, t: (["--data_dir", (t / "empty").mkdir() or t / "empty"], "no images found")),
    "truncated image": (lambda d, t: (lambda bad: (["--data_dir", bad[0], "--no_cache", "--num_workers", "1"], bad[1]))(corrupt_copy(d, t))),
    "truncated image cached": (lambda d, t: (lambda bad: (["--data_dir", bad[0]], bad[1]))(corrupt_copy(d, t))),
    "malformed profile": (lambda d, t: (lambda bad: (["--data_dir", bad[0]], bad[1]))(renamed_copy(d, t, "000000_female"))),
    "bad age": (lambda d, t: (lambda bad: (["--data_dir", bad[0]], bad[1]))(renamed_copy(d, t, "000000_male_Asian_x9"))),
    "unknown model": (lambda d, t: (["--model", "vgg99"], "BaseModel")),
    "unknown loss": (lambda d, t: (["--criterion", "hinge"], "label_smoothing")),
    "unknown augmentation": (lambda d, t: (["--augmentation", "mixup"], "flip_affine")),
    "unknown optimizer": (lambda d, t: (["--optimizer", "Lion"], "AdamW")),
    "unknown scheduler": (lambda d, t: (["--scheduler", "onecycle"], "cosine")),
    "resize one number": (lambda d, t: (["--resize", "128"], "--resize")),
    "val ratio": (lambda d, t: (["--val_ratio", "1.5"], "--val_ratio 1.5")),
    "flag typo": (lambda d, t: (["--learning_rate", "0.1"], "--learning_rate")),
    "config unknown key": (lambda d, t: (["--config", (t / "c.json").write_text('{"lr": 0.1, "batchsize": 8}') and t / "c.json"], "'batchsize'")),
    "weights nowhere": (lambda d, t: (["--model", "efficientnet_b0", "--pretrained", "--weights", t / "no.pth"], "no.pth")),
    "kfold fold": (lambda d, t: (["--kfold", "3", "--fold", "3"], "--fold 3")),
    "malformed YAML config": (lambda d, t: (["--config", write(t / "c.yml", "lr: [0.1\nepochs: 3\n")], "c.yml: not valid YAML")),
    "malformed JSON config": (lambda d, t: (["--config", write(t / "c.json", '{"lr": 0.1,}')], "c.json: not valid JSON")),
    "garbage resume": (lambda d, t: (["--resume", write(t / "last.pth", "not a checkpoint")], "last.pth: not a PyTorch file")),
    "truncated resume": (lambda d, t: (["--resume", truncated_checkpoint(t / "last.pth")], "last.pth: not a PyTorch file")),
    "garbage weights": (lambda d, t: (["--model", "efficientnet_b0", "--pretrained", "--weights", write(t / "w.pth", "junk")],
                                      "--weights " + str(t / "w.pth") + ": not a PyTorch file")),
    "one class": (lambda d, t: (["--dataset", "ImageFolderDataset", "--data_dir", one_class(t)], "at least 2 class folders")),
    "negative early stopping": (lambda d, t: (["--early_stopping", "-1"], "--early_stopping -1: must be 0 or more")),
    "negative milestone": (lambda d, t: (["--scheduler", "multistep", "--milestones", "-3", "2"], "--milestones -3 2: must be epochs, counted from 1")),
    "workers below -1": (lambda d, t: (["--num_workers", "-5"], "--num_workers -5: must be -1")),
    "device feed without a cache": (lambda d, t: (["--feed", "device", "--no_cache"], "--feed device needs the decoded-image cache")),
    "reversed age bounds": (lambda d, t: (["--age_bounds", "60", "30"], "--age_bounds 60 30: must be 0 < LOW < HIGH")),
    "dropout above 1": (lambda d, t: (["--dropout", "2"], "--dropout 2.0: must be in [0, 1)")),
    "lr nan": (lambda d, t: (["--lr", "nan"], "--lr nan: must be positive")),
    "zero steps": (lambda d, t: (["--steps", "0"], "--steps 0: must be positive")),
    "negative warmup": (lambda d, t: (["--warmup_epochs", "-1"], "--warmup_epochs -1: must be 0 or more")),
    "ema warmup without ema": (lambda d, t: (["--ema_warmup"], "--ema_warmup warms up --ema's moving average, which is off")),
    "config is a directory": (lambda d, t: (["--config", t], f"--config {t}: not a file")),
    "resume is a directory": (lambda d, t: (["--resume", t], f"--resume {t}: not a file")),
    # as root, chmod blocks no write: a folder under a file is one that fails for everyone (ENOTDIR)
    "model dir under a file": (lambda d, t: (["--model_dir", write(t / "f", "") / "runs"],
                                             f"--model_dir {t / 'f' / 'runs'}: cannot write there ({t / 'f'} is a file)")),
    "cache dir under a file": (lambda d, t: (["--cache_dir", write(t / "f", "") / "cache"],
                                             f"--cache_dir {t / 'f' / 'cache'}: cannot write there (Not a directory)")),
}


def write(path, text):
    path.write_text(text)
    return path


def truncated_checkpoint(path):
    torch.save({"state_dict": create_model("BaseModel", 18).state_dict(), "epoch": 1}, path)
    path.write_bytes(path.read_bytes()[:5000])
    return path


def one_class(tmp_path):
    for i in range(4):
        (tmp_path / "cats" / "only").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (i * 50, 20, 20)).save(tmp_path / "cats" / "only" / f"{i}.png")
    return tmp_path / "cats"


@pytest.fixture
def train_cli(demo_dir, cache_dir, tmp_path, capsys):
    """train.py's cli() in this process, on the tiny demo data, its signal handlers put back after
    -> (exit code, stdout, stderr)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    base = ["--model_dir", tmp_path / "runs", "--cache_dir", cache_dir, *TINY,
            "--data_dir", demo_dir / "train", "--eval_dir", demo_dir / "eval"]
    yield lambda *args: run_cli(train.cli, capsys, *base, *args)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def earlier_run(tmp_path):
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    (tmp_path / "runs" / "exp" / "best.pth").write_text("earlier run")


def assert_one_line_and_nothing_written(code, stderr, expected, tmp_path):
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and str(expected) in lines[0], stderr
    assert (tmp_path / "runs" / "exp" / "best.pth").read_text() == "earlier run"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp"]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_clear_line(case, train_cli, demo_dir, tmp_path):
    earlier_run(tmp_path)
    args, expected = BAD_INPUTS[case](demo_dir, tmp_path)
    code, _, stderr = train_cli(*args)
    assert_one_line_and_nothing_written(code, stderr, expected, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["flag typo", "truncated image", "config unknown key", "model dir under a file",
                                  "cache dir under a file"])
def test_bad_input_one_clear_line_from_a_real_process(case, run_train, demo_dir, tmp_path):
    """The same through a real `python train.py`: nothing else (a warning, a traceback) reaches stderr."""
    earlier_run(tmp_path)
    args, expected = BAD_INPUTS[case](demo_dir, tmp_path)
    proc = run_train(*args, check=False, timeout=120)
    assert_one_line_and_nothing_written(proc.returncode, proc.stderr, expected, tmp_path)


@pytest.mark.slow
def test_invalid_value_one_line(run_train):
    proc = run_train("--epochs", "1", "--lr", "-1", check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "train.py: error: --lr -1.0: must be positive"


@pytest.mark.slow
def test_step_budget_sets_the_epochs_from_the_data_size(run_train, tmp_path):
    proc = run_train("--steps", "10")
    plan = next(line for line in proc.stdout.splitlines() if line.startswith("training "))
    epochs, per_epoch = int(plan.split()[1]), int(plan.split()[-4])
    n_train = int(re.search(r"(\d+) train / ", proc.stdout).group(1))
    assert per_epoch == n_train // 32 and epochs == math.ceil(10 / per_epoch) and epochs > 1
    run = tmp_path / "runs" / "exp"
    assert len(read_csv(run / "history.csv")) == epochs
    assert json.loads((run / "config.json").read_text())["epochs"] == epochs  # --config config.json re-runs the same
    # a user who gives --epochs gets exactly that, whatever --steps says
    run_train("--steps", "10", "--epochs", "1")
    assert len(read_csv(tmp_path / "runs" / "exp2" / "history.csv")) == 1


@pytest.mark.slow
def test_run_that_ends_still_rising_says_so_in_one_line(run_train):
    proc = run_train("--epochs", "4", "--lr", "3e-4")
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warning == [line for line in proc.stderr.splitlines() if "still rising" in line]
    assert len(warning) == 1 and warning[0].endswith("train longer, e.g. --epochs 8"), proc.stderr


# ----------------------------------------------------------------------------- hardening: each case fails on the old code
@pytest.mark.slow
def test_crafted_checkpoint_is_real_and_refused_by_resume(run_train, tmp_path):
    proof = tmp_path / "proof.pth"
    crafted_checkpoint(proof, tmp_path / "proof-ran")
    torch.load(proof, weights_only=False)  # the file really runs code when loaded the unsafe way
    assert (tmp_path / "proof-ran").exists()
    marker = tmp_path / "pwned"
    (tmp_path / "runs" / "x").mkdir(parents=True)
    evil = crafted_checkpoint(tmp_path / "runs" / "x" / "last.pth", marker)
    proc = run_train("--resume", evil, check=False)
    assert proc.returncode == 1 and not marker.exists()
    assert proc.stderr.strip().splitlines() == [f"train.py: error: checkpoint {evil}: refused: it holds Python objects other than "
                                                f"tensors and plain values, and loading those could run code"]


@pytest.mark.slow
def test_diverged_run_fails_without_submission(run_train, tmp_path):
    proc = run_train("--lr", "1e6", "--epochs", "3", check=False)
    run = tmp_path / "runs" / "exp"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "training diverged" in lines[0], proc.stderr
    assert not (run / "submission.csv").exists()
    if (run / "last.pth").exists():  # what was saved before the divergence is finite
        state = torch.load(run / "last.pth", weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def read_row_line(proc, prefix="epoch 1 |", timeout=120):
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
        assert time.time() < deadline
    raise AssertionError(f"no line starting {prefix!r}: {proc.communicate()}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_right_after_epoch_line_keeps_that_epoch(demo_dir, cache_dir, tmp_path, run_train, signum):
    # the epoch's line is printed after best.pth, last.pth and history.csv are written, never before
    proc = start_train(demo_dir, cache_dir, tmp_path, "--epochs", "40")
    read_row_line(proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    run = tmp_path / "runs" / "exp"
    assert proc.returncode == -signum
    last = torch.load(run / "last.pth", weights_only=True)
    assert last["epoch"] >= 1 and len(read_csv(run / "history.csv")) == last["epoch"]
    assert stderr.strip().splitlines()[-1] == (f"train.py: interrupted; {run / 'last.pth'} holds epoch {last['epoch']}: "
                                               f"continue with --resume {run / 'last.pth'}")
    proc = run_train("--resume", run / "last.pth", "--epochs", last["epoch"] + 1, data=False)
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == last["epoch"] + 1


@pytest.mark.slow
def test_stop_before_first_epoch_says_nothing_to_resume(demo_dir, cache_dir, tmp_path):
    proc = start_train(demo_dir, cache_dir, tmp_path, "--epochs", "40")
    read_row_line(proc, prefix="run dir")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT
    if not (tmp_path / "runs" / "exp" / "last.pth").exists():
        assert stderr.strip().splitlines()[-1] == "train.py: interrupted; no epoch finished, so there is nothing to resume"


@pytest.mark.slow
def test_sigint_stops_a_background_job_that_started_with_sigint_ignored(demo_dir, cache_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--data_dir", str(demo_dir / "train"), "--model_dir", str(tmp_path / "runs"),
           "--cache_dir", str(cache_dir), *TINY, "--epochs", "200"]
    # what `python train.py &` in a shell script gets: SIGINT ignored from the start
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for_epochs(tmp_path / "runs" / "exp" / "history.csv", 1, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGINT and "interrupted" in stderr


@pytest.mark.slow
def test_resume_refuses_flags_it_cannot_change_before_writing(run_train, tmp_path):
    run_train("--epochs", "1")
    run = tmp_path / "runs" / "exp"
    config = (run / "config.json").read_text()
    refusals = [(["--optimizer", "SGD"], "--resume: --optimizer SGD differs from the run's AdamW"),
                (["--model", "resnet18"], "--resume: --model resnet18 differs from the run's BaseModel"),
                (["--head", "64"], "--resume: --head 64 differs from the run's none"),
                ([], f"--resume {run / 'best.pth'}: not a last.pth (no optimizer, scheduler, history)")]
    for given, expected in refusals:
        target = run / ("best.pth" if not given else "last.pth")
        proc = run_train("--resume", target, *given, data=False, check=False)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"train.py: error: {expected}"), proc.stderr
        assert (run / "config.json").read_text() == config


@pytest.mark.slow
def test_resume_with_more_epochs_replans_schedule_and_logs_each_epochs_lr(run_train, tmp_path):
    run_train("--epochs", "2", "--lr", "0.004")
    run = tmp_path / "runs" / "exp"
    run_train("--resume", run / "last.pth", "--epochs", "4", data=False)
    lrs = [float(r["lr"]) for r in read_csv(run / "history.csv")]
    # epochs 1-2 planned for 2 epochs, 3-4 re-planned for 4: cosine at 2/4 and 3/4 of the way
    expected = [0.004, 0.002, 0.004 * 0.5 * (1 + math.cos(math.pi * 2 / 4)), 0.004 * 0.5 * (1 + math.cos(math.pi * 3 / 4))]
    assert lrs == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("ema", [["--ema", "0"], ["--ema", "0.9"], ["--ema", "0.99", "--ema_warmup"]])
def test_resume_continues_the_random_streams_exactly(run_train, tmp_path, ema):
    """And with --ema, the weights' moving average: last.pth holds it beside the trained weights, --ema_warmup
    carried on into the resumed part."""
    flags = ["--scheduler", "none", "--early_stopping", "5", *ema]
    run_train("--epochs", "3", "--name", "whole", *flags)
    run_train("--epochs", "1", "--name", "split", *flags)
    split = tmp_path / "runs" / "split"
    run_train("--resume", split / "last.pth", "--epochs", "3", data=False)
    whole, parts = read_csv(tmp_path / "runs" / "whole" / "history.csv"), read_csv(split / "history.csv")
    for key in ("train_loss", "val_loss", "val_f1"):
        assert [float(r[key]) for r in parts] == pytest.approx([float(r[key]) for r in whole], rel=1e-5), key
    last = torch.load(split / "last.pth", weights_only=True)
    best_epoch = max(parts, key=lambda r: (float(r["val_accuracy"]), -int(r["epoch"])))["epoch"]
    assert last["train_state"]["stale"] == 3 - int(best_epoch)


@pytest.mark.slow
def test_command_line_flags_win_over_the_resumed_runs(run_train, tmp_path):
    run_train("--epochs", "1")
    args = flags.parse_args(["--resume", str(tmp_path / "runs" / "exp" / "last.pth"), "--epochs", "12"])
    assert args.epochs == 12 and args.resize == [64, 48]


@pytest.mark.parametrize("flag", ["--model_dir", "--cache_dir"])
def test_read_only_output_dir_is_one_line(flag, read_only_dir, train_cli, tmp_path):
    earlier_run(tmp_path)
    code, _, stderr = train_cli(flag, read_only_dir / "sub")
    assert_one_line_and_nothing_written(code, stderr, f"{flag} {read_only_dir / 'sub'}: cannot write there (Read-only file system)",
                                        tmp_path)


def small_disk(path, size_kb):
    """A folder whose disk holds size_kb: a tmpfs where mounting is allowed (root), else a per-file size limit."""
    path.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True).returncode == 0:
        return None

    def limit():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_kb * 1024, size_kb * 1024))
    return limit


@pytest.fixture
def full_disk(tmp_path):
    made = []

    def make(name, size_kb):
        made.append(tmp_path / name)
        return tmp_path / name, small_disk(tmp_path / name, size_kb)
    yield make
    for path in made:
        subprocess.run(["umount", str(path)], capture_output=True)


def run_limited(demo_dir, cache_dir, tmp_path, limit, *args):
    cmd = [sys.executable, str(ROOT / "train.py"), "--data_dir", str(demo_dir / "train"), "--model_dir", str(tmp_path / "runs"),
           "--cache_dir", str(cache_dir), *TINY, *map(str, args)]
    return subprocess.run(cmd, cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=300, preexec_fn=limit)


@pytest.mark.slow
def test_full_disk_in_run_dir_is_one_line_without_orphans(demo_dir, cache_dir, tmp_path, full_disk):
    runs, limit = full_disk("runs", 2048)  # best.pth fits, last.pth (with the optimiser state) does not
    proc = run_limited(demo_dir, cache_dir, tmp_path, limit, "--epochs", "2")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: cannot write {runs / 'exp' / 'last.pth'}: "), proc.stderr
    assert not [p for p in runs.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_keeps_the_epoch_before_and_resume_continues_once_freed(demo_dir, cache_dir, tmp_path, full_disk):
    """A disk that fills while a run trains (checkpoints beside a search's other trials): the write that fails names
    the file and the disk, best.pth and last.pth stay the epoch before's and load, and once there is space again
    --resume continues with the next epoch, the history unbroken."""
    from core.files import disk_space
    from training.checkpoint import load_model
    runs, limit = full_disk("runs", 16 * 1024)
    if limit is not None:
        pytest.skip("a disk that fills needs a tmpfs (mounting as root)")
    assert run_limited(demo_dir, cache_dir, tmp_path, None, "--epochs", "1").returncode == 0
    run, filler = runs / "exp", runs / "filler"
    filler.write_bytes(b"\0" * (disk_space(runs)[0] - 256 * 1024))  # room for a history line, not for a checkpoint
    stamps = {name: (run / name).read_bytes() for name in ("best.pth", "last.pth")}
    proc = run_limited(demo_dir, cache_dir, tmp_path, None, "--resume", run / "last.pth", "--epochs", "3")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert re.fullmatch(rf"train.py: error: cannot write {run}/(best|last)\.pth: the disk is full \({runs}: 0\.\d MB free of 16\.0 MB; "
                        rf".*\); {run}/last\.pth holds epoch 1: continue with --resume {run}/last\.pth", lines[0]), lines[0]
    assert {name: (run / name).read_bytes() for name in stamps} == stamps and not list(runs.rglob("*.tmp"))
    assert all(load_model(run / name)[1]["epoch"] == 1 for name in stamps)
    filler.unlink()
    assert run_limited(demo_dir, cache_dir, tmp_path, None, "--resume", run / "last.pth", "--epochs", "3").returncode == 0
    assert [int(r["epoch"]) for r in read_csv(run / "history.csv")] == [1, 2, 3]
    assert load_model(run / "last.pth")[1]["epoch"] == 3 and (run / "summary.json").is_file()


@pytest.mark.slow
def test_full_disk_for_the_cache_is_one_line_without_orphans(demo_dir, tmp_path, full_disk):
    cache, limit = full_disk("cache", 256)  # the tiny demo decodes to 1.5 MiB
    proc = run_limited(demo_dir, cache, tmp_path, limit, "--epochs", "1")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: cannot build the image cache in {cache}: "), proc.stderr
    assert not list(cache.glob("*.tmp")) and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("given, expected", [([], False), (["--cudnn_benchmark"], True)])
def test_cudnn_autotuning_only_when_asked(given, expected, demo_dir, cache_dir, tmp_path, monkeypatch):
    # Autotuning made efficientnet_b0's first CUDA step 5x slower: a short NNI trial must not pay it by default.
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not expected)
    train.main(flags.parse_args([*TINY, "--epochs", "1", "--data_dir", str(demo_dir / "train"), "--cache_dir", str(cache_dir),
                                 "--model_dir", str(tmp_path), *given]))
    assert torch.backends.cudnn.benchmark is expected


# ----------------------------------------------------------------------------- timm backbones
@pytest.mark.slow
@pytest.mark.parametrize("name,classification", [("timm/test_efficientnet", "single"), ("timm/test_vit", "multi_head")])
def test_timm_backbone_trains_resumes_and_predicts(run_train, tmp_path, demo_dir, name, classification):
    run_train("--model", name, "--classification", classification, "--epochs", "1", "--channels_last")
    run = tmp_path / "runs" / "exp"
    proc = run_train("--resume", run / "last.pth", "--epochs", "2", data=False)
    assert f"resuming {run} at epoch 2" in proc.stdout and len(read_csv(run / "history.csv")) == 2
    assert json.loads((run / "summary.json").read_text())["model"] == name
    out = tmp_path / "pred"
    proc = subprocess.run([sys.executable, str(ROOT / "baseline" / "inference.py"), "--checkpoint", str(run / "best.pth"),
                           "--eval_dir", str(demo_dir / "eval"), "--out", str(out), "--tta"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [r["ImageID"] for r in read_csv(out / "submission.csv")] == [r["ImageID"] for r in read_csv(demo_dir / "eval" / "info.csv")]


@pytest.mark.slow
def test_pretrained_timm_backbone_takes_its_weights_statistics_and_input_size(run_train, tmp_path):
    """Offline weights (.safetensors) for a timm model: inputs normalised with its pretraining mean/std (test_convnext:
    0.5), and with no --resize the model's own input size (160x160)."""
    import timm
    from safetensors.torch import save_file
    save_file(timm.create_model("test_convnext").state_dict(), tmp_path / "w.safetensors")
    run_train("--model", "timm/test_convnext", "--pretrained", "--weights", tmp_path / "w.safetensors", "--epochs", "1", "--resize", "96", "96")
    ckpt = torch.load(tmp_path / "runs" / "exp" / "best.pth", weights_only=True)
    assert ckpt["mean"] == [0.5] * 3 and ckpt["std"] == [0.5] * 3 and ckpt["resize"] == [96, 96]
    args = flags.parse_args(["--model", "timm/test_convnext", "--pretrained"])
    assert args.resize == [160, 160] and flags.parse_args(["--model", "timm/test_convnext"]).resize == list(flags.DEFAULT_SIZE)


def test_both_feeds_train_the_same_model(run_train, tmp_path):
    """--feed device draws the loader's batches: the same seed gives the same epochs, metric for metric."""
    runs = {}
    for feed in ("device", "loader"):
        proc = run_train("--epochs", "2", "--feed", feed, "--name", feed, "--augmentation", "flip_affine")
        assert proc.stdout.splitlines()[0].startswith(f"data feed: {feed} ("), proc.stdout
        runs[feed] = read_csv(tmp_path / "runs" / feed / "history.csv")
        assert json.loads((tmp_path / "runs" / feed / "summary.json").read_text())["feed"] == feed
    timing = {"seconds", "train_images_per_s"}
    assert [{k: v for k, v in row.items() if k not in timing} for row in runs["device"]] == \
           [{k: v for k, v in row.items() if k not in timing} for row in runs["loader"]]


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_weights(run_train, tmp_path):
    """--compile compiles in place: the checkpoint keeps the keys a plain model (and every tool) loads."""
    run_train("--epochs", "1", "--compile", "default", timeout=900)
    state = torch.load(tmp_path / "runs" / "exp" / "best.pth", weights_only=True)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k]
    create_model("BaseModel", 18, dropout=0.2).load_state_dict(state)  # train.py's defaults
    assert (tmp_path / "runs" / "exp" / "submission.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("augmentation", ["randaugment", "trivialaugment"])
def test_the_libraries_augmentations_and_mixing_train_a_run(run_train, tmp_path, augmentation):
    """torchvision's RandAugment or TrivialAugmentWide per image, MixUp and CutMix, label smoothing: a whole run trains on
    the mixed soft targets, validates and predicts on plain images, and records the levers in config.json."""
    run_train("--epochs", "2", "--augmentation", augmentation, "--randaugment_magnitude", "15", "--mixup", "0.2", "--cutmix", "1.0",
              "--criterion", "label_smoothing")
    run_dir = tmp_path / "runs" / "exp"
    history = read_csv(run_dir / "history.csv")
    assert len(history) == 2 and all(0 < float(row["train_loss"]) < 10 and float(row["val_loss"]) < 10 for row in history)
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["augmentation"], config["randaugment_magnitude"], config["mixup"], config["cutmix"]) == (augmentation, 15, 0.2, 1.0)
    assert (run_dir / "submission.csv").is_file()


@pytest.mark.slow
def test_a_users_albumentations_pipeline_trains_in_the_loader(run_train, tmp_path):
    """--albumentations FILE (albumentations' own A.save): run per image in the loader's workers, so the device feed is
    off and one line says so; the run records the file; --feed device with it is refused in one line."""
    import albumentations as A
    path = tmp_path / "pipeline.yaml"
    A.save(A.Compose([A.HorizontalFlip(), A.Affine(rotate=(-10, 10), p=0.5), A.CLAHE(p=0.3)]), str(path), data_format="yaml")
    proc = run_train("--epochs", "2", "--albumentations", path, "--augmentation", "base", "--num_workers", "2")
    assert "data feed: loader, not device (--albumentations runs per image in the loader's workers)" in proc.stdout
    run_dir = tmp_path / "runs" / "exp"
    assert len(read_csv(run_dir / "history.csv")) == 2 and (run_dir / "submission.csv").is_file()
    assert json.loads((run_dir / "config.json").read_text())["albumentations"] == str(path)
    refused = run_train("--albumentations", path, "--feed", "device", check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "train.py: error: --albumentations runs per image in the loader's workers: give --feed auto or loader, not device"]


@pytest.mark.parametrize("sampler, equal", [("none", False), ("weighted", True)])
def test_weighted_loss_weighs_the_classes_as_the_sampler_draws_them(demo_dir, cache_dir, sampler, equal, capsys):
    """--sampler weighted with weighted_cross_entropy balanced the rare classes twice (runs collapsed to F1 0.1-0.3):
    the loss now weighs what the sampler draws, so with it the weights are equal, and a line says so."""
    args = flags.resolve(flags.build_parser().parse_args(["--criterion", "weighted_cross_entropy", "--sampler", sampler,
                                                          "--data_dir", str(demo_dir / "train"), *TINY]))
    device = torch.device("cpu")
    data = train.dataset.load_training_data(
        dataset=args.dataset, data_dir=args.data_dir, eval_dir=None, age_bounds=args.age_bounds, val_ratio=args.val_ratio,
        seed=args.seed, kfold=0, fold=0, resize=args.resize, augmentation=args.augmentation, sampler=args.sampler,
        batch_size=args.batch_size, valid_batch_size=args.valid_batch_size, num_workers=0, cache_dir=cache_dir, use_cache=True,
        device=device)
    weights = train.build_recipe(args, data, torch.nn.Linear(2, 2), device).criterion.weight
    weights = weights[torch.as_tensor(data.class_counts > 0)]  # a class absent from training is never a target
    assert torch.allclose(weights, weights[0].expand_as(weights)) == equal
    assert ("already draws every class alike" in capsys.readouterr().out) == equal


def test_ema_weights_are_what_best_pth_holds_and_says(run_train, tmp_path):
    """--ema: validation scored the averaged weights, so best.pth holds them (and says so in its flags), while
    last.pth keeps the trained ones to resume from, the average beside them."""
    run_train("--epochs", "1", "--ema", "0.9")
    run = tmp_path / "runs" / "exp"
    best, last = (torch.load(run / name, weights_only=True) for name in ("best.pth", "last.pth"))
    assert best["args"]["ema"] == 0.9 and best["epoch"] == last["epoch"] == 1
    assert all(torch.equal(best["state_dict"][k], last["ema"][k]) for k in last["ema"])
    assert any(not torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    assert "ema" not in best


def test_ema_warmup_follows_the_runs_step_count_across_a_resume(demo_dir, cache_dir, tmp_path, monkeypatch):
    """--ema_warmup: the moving average is timm's with use_warmup, and each epoch passes on the optimiser steps
    before it, counted from the run's start also when it was resumed (the warmup's decay goes by that count)."""
    calls, one_epoch = [], train.train_one_epoch
    def recording(model, loader, **kw):
        calls.append((kw["steps_before"], len(loader), kw["ema"].use_warmup))
        return one_epoch(model, loader, **kw)
    monkeypatch.setattr(train, "train_one_epoch", recording)
    base = [*TINY, "--data_dir", str(demo_dir / "train"), "--cache_dir", str(cache_dir), "--model_dir", str(tmp_path),
            "--ema", "0.99", "--ema_warmup", "--scheduler", "none"]
    train.main(flags.parse_args([*base, "--epochs", "1"]))
    train.main(flags.parse_args(["--resume", str(tmp_path / "exp" / "last.pth"), "--epochs", "3"]))
    steps = calls[0][1]
    assert calls == [(0, steps, True), (steps, steps, True), (2 * steps, steps, True)] and steps > 1


def test_best_epochs_averaged_into_best_pth_as_summary_json_says(run_train, tmp_path):
    """--average_epochs 3: the best epochs' weights averaged greedily at the end; summary.json says which joined,
    validation never scores below the best epoch's, and val_soft.csv and best.pth hold the kept average."""
    run_train("--epochs", "4", "--average_epochs", "3", "--lr", "0.01")
    run = tmp_path / "runs" / "exp"
    summary, history = json.loads((run / "summary.json").read_text()), read_csv(run / "history.csv")
    best_epoch = max(history, key=lambda r: (float(r["val_accuracy"]), -int(r["epoch"])))
    members = summary["averaged_epochs"]
    assert members[0] == int(best_epoch["epoch"]) and len(members) <= 3 and set(members) <= {1, 2, 3, 4}
    assert summary["best"]["value"] >= float(best_epoch["val_accuracy"]) and not (run / "epochs").exists()
    best = torch.load(run / "best.pth", weights_only=True)
    assert best.get("averaged_epochs", members[:1]) == members  # saved anew only when more than the best joined
    val_soft = read_csv(run / "val_soft.csv")
    probs = np.array([[float(v) for v in list(r.values())[2:]] for r in val_soft])
    assert summary["best"]["val_accuracy"] == pytest.approx(float((probs.argmax(1) == [int(r["label"]) for r in val_soft]).mean()))


# ----------------------------------------------------------------------------- tensor shapes a GPU meets
def shapes_reaching_the_model(monkeypatch, *args):
    """Every distinct (shape, dtype, memory format, autocast) of the batches that reach the model (and --ema's copy) in
    one in-process train.py run: on a GPU each new one costs seconds of kernel selection."""
    seen = set()

    def record(module, inputs):
        x = inputs[0]
        seen.add((tuple(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                  torch.is_autocast_enabled(x.device.type)))

    def hooked(*a, **k):
        model = create_model(*a, **k)
        model.register_forward_pre_hook(record)
        return model
    monkeypatch.setattr(train, "create_model", hooked)
    train.main(flags.parse_args([str(a) for a in args]))
    return seen


@pytest.mark.parametrize("extra, most", [([], 2), (["--channels_last"], 2), (["--average_epochs", "2", "--ema", "0.9"], 3)])
def test_training_validation_and_eval_meet_at_most_two_shapes_on_a_gpu(extra, most, demo_dir, cache_dir, tmp_path, monkeypatch):
    """Training batches are one shape (the last dropped); validation and the eval prediction share one (short batches
    padded to it), in the training's memory format; --average_epochs' BatchNorm pass may add one. Padded as on a GPU
    (train.pad_length's CUDA answer: there is none here)."""
    monkeypatch.setattr(train, "pad_length", lambda device, length: length)
    seen = shapes_reaching_the_model(monkeypatch, *TINY, "--epochs", "2", "--data_dir", demo_dir / "train", "--eval_dir",
                                     demo_dir / "eval", "--cache_dir", cache_dir, "--model_dir", tmp_path, *extra)
    assert len(seen) <= most, seen
    assert {channels_last for _, _, channels_last, _ in seen} == {"--channels_last" in extra}
    assert len({shape for shape, *_ in seen}) == 2  # training's batch, and one for every validation and eval batch


def test_on_the_cpu_no_batch_is_padded(demo_dir, cache_dir, tmp_path, monkeypatch):
    """On a CPU padding is only more work (8% of a demo run's wall time when the validation set is half the eval
    set): every batch reaching the model holds real images, the validation set's in one batch of its own length."""
    seen = shapes_reaching_the_model(monkeypatch, *TINY, "--epochs", "1", "--data_dir", demo_dir / "train", "--eval_dir",
                                     demo_dir / "eval", "--cache_dir", cache_dir, "--model_dir", tmp_path, "--name", "r")
    val = len(read_csv(tmp_path / "r" / "val_soft.csv"))
    lengths = {shape[0] for shape, *_ in seen}
    assert val in lengths and len(lengths) == 3, lengths  # training's batch, validation's, the eval prediction's


def test_prediction_under_autocast_agrees_with_fp32(demo_dir, cache_dir, tmp_path):
    """The eval prediction runs under the training's autocast (bf16 here, on the CPU) and memory format: on a trained
    model its answers are fp32's on at least 99% of images, and any that differ were near ties in fp32."""
    from training import checkpoint
    from training.predict import predict_images
    train.main(flags.parse_args([*TINY, "--epochs", "3", "--data_dir", str(demo_dir / "train"), "--cache_dir", str(cache_dir),
                                 "--model_dir", str(tmp_path), "--name", "r", "--channels_last"]))
    paths = sorted(str(p) for p in (demo_dir / "train").rglob("*.jpg"))
    model, meta = checkpoint.load_model(tmp_path / "r" / "best.pth", torch.device("cpu"))
    common = dict(device=torch.device("cpu"), cache_dir=cache_dir, batch_size=50)
    exact = predict_images(model, meta, paths, **common)
    model = model.to(memory_format=torch.channels_last)
    fast = predict_images(model, meta, paths, amp_dtype=torch.bfloat16, channels_last=True, **common)
    agree = exact.argmax(1) == fast.argmax(1)
    assert len(paths) >= 100 and agree.mean() >= 0.99, agree.mean()
    top2 = np.sort(exact, axis=1)[:, -2:]
    assert ((top2[:, 1] - top2[:, 0])[~agree] < 0.05).all()
    assert np.abs(exact - fast).max() < 0.05


# ----------------------------------------------------------------------------- a resume: what it keeps, what it takes now
def in_process(demo_dir, cache_dir, tmp_path, *args):
    """train.main on the tiny demo data (with its eval dir) in this process; --resume: its flags only."""
    given = [str(a) for a in args]
    if "--resume" not in given:
        given = [*TINY, "--data_dir", str(demo_dir / "train"), "--eval_dir", str(demo_dir / "eval"), "--cache_dir", str(cache_dir),
                 "--model_dir", str(tmp_path), "--name", "r", *given]
    return train.main(flags.parse_args(given))


@pytest.mark.parametrize("scheduler, lr_epoch_2", [("plateau", 0.01), ("cosine", 0.01 * 0.5)])
def test_resume_trains_with_the_optimiser_settings_given_now(scheduler, lr_epoch_2, demo_dir, cache_dir, tmp_path):
    """--resume with a new --lr, --weight_decay and --momentum: the optimiser state loaded from last.pth overrode them
    (it trained on at weight decay 1e-4 and, under plateau, lr 0.002) while config.json and the checkpoint's args said
    0.05 and 0.01. Now config.json, last.pth's args and the optimiser's own groups agree, and so does history's lr."""
    in_process(demo_dir, cache_dir, tmp_path, "--epochs", "1", "--optimizer", "SGD", "--scheduler", scheduler)
    last = tmp_path / "r" / "last.pth"
    in_process(demo_dir, cache_dir, tmp_path, "--resume", last, "--epochs", "2", "--lr", "0.01", "--weight_decay", "0.05",
               "--momentum", "0.5")
    config, ckpt = json.loads((tmp_path / "r" / "config.json").read_text()), torch.load(last, weights_only=True)
    for recorded in (config, ckpt["args"]):
        assert (recorded["lr"], recorded["weight_decay"], recorded["momentum"]) == (0.01, 0.05, 0.5)
    groups = ckpt["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["momentum"], g["initial_lr"] if scheduler == "cosine" else g["lr"]) for g in groups] == \
           [(0.05, 0.5, 0.01)] * len(groups)
    assert [float(r["lr"]) for r in read_csv(tmp_path / "r" / "history.csv")] == pytest.approx([0.002, lr_epoch_2])


def test_resume_of_an_averaged_run_beats_the_average_and_says_what_best_pth_holds(demo_dir, cache_dir, tmp_path):
    """A finished --average_epochs run resumed for more epochs: its best started from the best epoch's metric, not the
    average's that best.pth held (a worse later epoch could replace the better average), and summary.json named the
    resumed epochs as averaged while best.pth held epochs 1-2. Now best.pth, summary.json, val_soft.csv and history
    agree after every resume, and the best never falls below the average: resumed once for an epoch at a high
    --lr, then for two more, which are averaged among themselves against it."""
    in_process(demo_dir, cache_dir, tmp_path, "--epochs", "2", "--ema", "0.9", "--ema_warmup", "--average_epochs", "2", "--lr", "0.01")
    run = tmp_path / "r"
    average = torch.load(run / "best.pth", weights_only=True)["best_metric"]
    for epochs, lr in ((3, "0.1"), (5, "0.01")):
        in_process(demo_dir, cache_dir, tmp_path, "--resume", run / "last.pth", "--epochs", epochs, "--lr", lr)
        best = torch.load(run / "best.pth", weights_only=True)
        summary, history = json.loads((run / "summary.json").read_text()), read_csv(run / "history.csv")
        assert [int(r["epoch"]) for r in history] == list(range(1, epochs + 1)) and not (run / "epochs").exists()
        assert best["best_metric"] >= max(average, *(float(r["val_accuracy"]) for r in history))
        assert summary["averaged_epochs"] == best.get("averaged_epochs", [best["epoch"]])
        assert (summary["best"]["value"], summary["best"]["epoch"]) == (best["best_metric"], best["epoch"])
        val_soft = read_csv(run / "val_soft.csv")
        probs = np.array([[float(v) for v in list(r.values())[2:]] for r in val_soft])
        accuracy = float((probs.argmax(1) == [int(r["label"]) for r in val_soft]).mean())
        assert summary["best"]["val_accuracy"] == pytest.approx(accuracy) == best["best_metric"]  # --metric accuracy


def test_resume_of_an_early_stopped_run_trains_no_more_and_writes_its_outputs(demo_dir, cache_dir, tmp_path, capsys):
    """A run that stopped early, resumed (a stop signal cut its outputs short): it trained one more epoch past the stop."""
    in_process(demo_dir, cache_dir, tmp_path, "--epochs", "6", "--early_stopping", "1", "--lr", "1e-7")
    run = tmp_path / "r"
    epochs = len(read_csv(run / "history.csv"))
    assert epochs < 6 and "early stopping" in capsys.readouterr().out
    (run / "summary.json").unlink()
    in_process(demo_dir, cache_dir, tmp_path, "--resume", run / "last.pth", "--epochs", "6")
    assert len(read_csv(run / "history.csv")) == epochs and json.loads((run / "summary.json").read_text())["epochs"] == epochs
    assert "early stopping: no better accuracy for 1 epochs, before this resume" in capsys.readouterr().out


def has_figures(run):
    images = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload().Tags()["images"]
    return {"val/confusion_matrix", "val/predictions"} <= set(images)


@pytest.mark.slow
@pytest.mark.parametrize("fold", [[], ["--kfold", "2", "--fold", "1"]])
def test_stop_right_after_the_last_epoch_then_resume_writes_every_output(demo_dir, cache_dir, tmp_path, run_train, fold):
    """SIGINT right after the last epoch's line, then the printed --resume: it ended well with summary.json, but without
    val_soft.csv (a --kfold fold's out-of-fold part) and the TensorBoard figures, which only a new best used to write."""
    proc = start_train(demo_dir, cache_dir, tmp_path, "--epochs", "2", "--eval_dir", demo_dir / "eval", *fold)
    read_row_line(proc, prefix="epoch 2 |")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    run = tmp_path / "runs" / "exp"
    assert proc.returncode == -signal.SIGINT and not (run / "summary.json").exists()
    assert stderr.strip().splitlines()[-1].endswith(f"--resume {run / 'last.pth'}")
    proc = run_train("--resume", run / "last.pth", data=False)
    summary = json.loads((run / "summary.json").read_text())
    assert {"val_soft.csv", "submission.csv", "submission_soft.csv"} <= set(summary["files"]) and has_figures(run)
    assert len(read_csv(run / "val_soft.csv")) == summary["val_images"] and len(read_csv(run / "history.csv")) == 2
    assert f"resuming {run} at epoch 3: its 2 epochs are done" in proc.stdout


@pytest.mark.slow
def test_stop_during_the_eval_prediction_says_training_finished_and_resume_finishes_it(cache_dir, tmp_path, run_train):
    """SIGINT after `best val ... -> best.pth`, during the eval prediction, said `stopped before training started`."""
    from core.demo import make_demo_data
    data = make_demo_data(tmp_path / "big", profiles=24, eval_profiles=30, size=(64, 48), seed=3)  # a prediction to stop
    proc = start_train(data, cache_dir, tmp_path, "--epochs", "1", "--eval_dir", data / "eval", "--valid_batch_size", "4")
    read_row_line(proc, prefix="best val")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    run, last = tmp_path / "runs" / "exp", tmp_path / "runs" / "exp" / "last.pth"
    assert proc.returncode == -signal.SIGINT and not (run / "submission.csv").exists()
    assert stderr.strip().splitlines()[-1] == (f"train.py: interrupted; training finished ({last} holds its last epoch, 1; "
                                               f"{run / 'best.pth'} its best, epoch 1), but the eval prediction was "
                                               f"interrupted: write what is missing with --resume {last}")
    run_train("--resume", last, data=False)
    submission = read_csv(run / "submission.csv")
    assert [r["ImageID"] for r in submission] == [r["ImageID"] for r in read_csv(data / "eval" / "info.csv")]
    assert "submission.csv" in json.loads((run / "summary.json").read_text())["files"]
