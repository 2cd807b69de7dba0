import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from conftest import ROOT, TINY, read_csv, train_env



def test_end_to_end_writes_every_output(run_train, tmp_path, demo_dir):
    proc = run_train("--epochs", "2")
    run = tmp_path / "runs" / "exp"
    assert f"run dir {run}" in proc.stdout
    for name in ("config.json", "best.pth", "last.pth", "history.csv", "submission.csv", "submission_soft.csv"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp"))

    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 2 and config["resize"] == [64, 48] and "config" not in config

    history = read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert {"val_accuracy", "val_f1", "val_mask_f1", "val_gender_f1", "val_age_f1", "val_loss", "lr"} <= set(history[0])

    best = torch.load(run / "best.pth", weights_only=True)
    assert best["model"] == "BaseModel" and best["classification"] == "single" and len(best["classes"]) == 18
    assert best["resize"] == [64, 48] and len(best["mean"]) == 3 and best["metric"] == "accuracy"
    assert best["best_metric"] == max(float(r["val_accuracy"]) for r in history)
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
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_clear_line(case, run_train, demo_dir, tmp_path):
    (tmp_path / "runs" / "exp").mkdir(parents=True)
    (tmp_path / "runs" / "exp" / "best.pth").write_text("earlier run")
    args, expected = BAD_INPUTS[case](demo_dir, tmp_path)
    proc = run_train(*args, check=False, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and str(expected) in lines[0], proc.stderr
    assert (tmp_path / "runs" / "exp" / "best.pth").read_text() == "earlier run"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["exp"]


# ----------------------------------------------------------------------------- parameter merging (NNI, --config)
@pytest.fixture
def parser_args():
    parser = train.build_parser()
    return parser, parser.parse_args([])


def test_params_merge_with_types_and_nested_choices(parser_args):
    parser, args = parser_args
    params = {"lr": 0.01, "batch_size": 32.0, "resize": [64, 48], "freeze_backbone": True,
              "criterion": {"_name": "focal", "focal_gamma": 1.5}, "model": "resnet18"}
    train.apply_params(parser, args, params, "NNI parameters")
    assert (args.lr, args.batch_size, args.resize, args.freeze_backbone) == (0.01, 32, [64, 48], True)
    assert isinstance(args.batch_size, int)
    assert (args.criterion, args.focal_gamma, args.model) == ("focal", 1.5, "resnet18")


@pytest.mark.parametrize("params,message", [
    ({"learning_rate": 0.1}, "unknown parameter 'learning_rate'; valid: data_dir"),
    ({"batch_size": 32.5}, "'batch_size' must be int"),
    ({"lr": "fast"}, "'lr' must be float"),
    ({"model": "vgg"}, "'model': 'vgg' is not one of BaseModel"),
    ({"resize": 128}, "'resize' must be a list of 2"),
    ({"pretrained": "yes"}, "'pretrained' must be true/false"),
    ({"criterion": {"_name": "focal", "gama": 2}}, "unknown parameter 'gama'"),
    ({"criterion": {"focal_gamma": 2}}, "without '_name'"),
])
def test_params_rejected_with_key_named(parser_args, params, message):
    parser, args = parser_args
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        train.apply_params(parser, args, params, "NNI parameters")


def test_invalid_value_one_line(run_train):
    proc = run_train("--epochs", "1", "--lr", "-1", check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "train.py: error: --lr -1.0: must be positive"


def test_yaml_config_sets_defaults_that_flags_override(tmp_path):
    (tmp_path / "c.yml").write_text("lr: 0.01\nresize: [32, 24]\ncriterion: focal\nfocal_gamma: 3\nfreeze_backbone: true\n")
    args = train.parse_args(["--config", str(tmp_path / "c.yml"), "--lr", "0.5"])
    assert (args.lr, args.resize, args.criterion, args.focal_gamma, args.freeze_backbone) == (0.5, [32, 24], "focal", 3.0, True)
    (tmp_path / "bad.yml").write_text("lr: fast\n")
    with pytest.raises(ValueError, match="'lr' must be float"):
        train.parse_args(["--config", str(tmp_path / "bad.yml")])


@pytest.mark.parametrize("name", list(train.OPTIMIZERS))
def test_optimizers(name):
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = train.create_optimizer(name, params, lr=0.1, weight_decay=0.0, momentum=0.9)
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("name", list(train.SCHEDULERS))
def test_schedulers_step(name):
    opt = train.create_optimizer("SGD", [torch.nn.Parameter(torch.ones(2))], lr=1.0)
    sched = train.create_scheduler(name, opt, epochs=4, lr_decay_step=1, milestones=[1, 2], gamma=0.5)
    for _ in range(3):
        opt.step()
        if sched is not None:
            sched.step(0.5) if name == "plateau" else sched.step()
    assert (opt.param_groups[0]["lr"] < 1.0) == (name != "none")


def test_help_shows_defaults():
    text = train.build_parser().format_help()
    assert "(default: 12)" in text and "(default: BaseModel)" in text and "optimisation:" in text
