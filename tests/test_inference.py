"""baseline/inference.py on real checkpoints trained by train.py on the tiny demo data."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from baseline import inference
from conftest import ROOT, TINY, crafted_checkpoint, read_csv, run_cli, train_env
from core.labels import mask_class_names



def soft_probs(path):
    rows = read_csv(path)
    return [r["ImageID"] for r in rows], np.array([[float(v) for k, v in r.items() if k != "ImageID"] for r in rows])


def train(tmp, cache_dir, runs):
    """train.py as run_train runs it, once per module (the three at once: mostly start-up, which
    overlaps well): these checkpoints serve every test here."""
    procs = {}
    for name, args in runs.items():
        cmd = [sys.executable, str(ROOT / "train.py"), "--model_dir", str(tmp / "runs"), "--cache_dir", str(cache_dir), *TINY,
               "--epochs", "1", "--name", name, *map(str, args)]
        procs[name] = subprocess.Popen(cmd, cwd=tmp, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    return {name: tmp / "runs" / name for name in runs}


def colour_folders(root):
    """Class-per-folder data: 4 colours, numeric names included so natural order matters."""
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "10": (20, 20, 220), "2": (230, 230, 30)}
    rng = np.random.default_rng(0)
    for name, colour in colours.items():
        (root / "train" / name).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
    (root / "test" / "nested").mkdir(parents=True)
    Image.new("RGB", (32, 32), colours["red"]).save(root / "test" / "a.png")
    Image.new("RGB", (32, 32), colours["10"]).save(root / "test" / "nested" / "b.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_dir, cache_dir):
    tmp = tmp_path_factory.mktemp("inference")
    data = ["--data_dir", demo_dir / "train", "--eval_dir", demo_dir / "eval"]
    folder = colour_folders(tmp / "colours")
    return dict(train(tmp, cache_dir, {
        "single": data,
        "multi": [*data, "--classification", "multi_head", "--resize", 48, 32, "--seed", 3],
        "folder": ["--dataset", "ImageFolderDataset", "--data_dir", folder / "train", "--eval_dir", folder / "test",
                   "--resize", 32, 32, "--val_ratio", 0.5],
    }), colours=folder)



def test_script_reproduces_train_submission(runs, demo_dir, cache_dir, tmp_path):
    # the same best.pth on the same eval dir must give what train.py wrote after training
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "baseline" / "inference.py"), "--checkpoint", str(runs["single"] / "best.pth"),
                           "--eval_dir", str(demo_dir / "eval"), "--out", str(out), "--cache_dir", str(cache_dir), "--num_workers", "0"],
                          cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "1 checkpoint" in proc.stdout
    assert read_csv(out / "submission.csv") == read_csv(runs["single"] / "submission.csv")
    ids, probs = soft_probs(out / "submission_soft.csv")
    train_ids, train_probs = soft_probs(runs["single"] / "submission_soft.csv")
    assert ids == train_ids == [r["ImageID"] for r in read_csv(demo_dir / "eval" / "info.csv")]
    assert np.allclose(probs, train_probs, atol=2e-6)
    assert list(read_csv(out / "submission_soft.csv")[0])[1:] == list(read_csv(runs["single"] / "submission_soft.csv")[0])[1:]


def test_tta_is_flip_invariant(runs, demo_dir, cache_dir, tmp_path):
    # TTA averages an image and its mirror, so a mirrored eval set must give the same probabilities
    # (64x48 demo images at --resize 64 48: decoding involves no crop, so flipping commutes with it)
    mirrored = tmp_path / "mirrored"
    shutil.copytree(demo_dir / "eval", mirrored)
    for image in (mirrored / "images").iterdir():
        Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(image, format="PNG")  # lossless, the name stays
    checkpoint = [runs["single"] / "best.pth"]
    kw = dict(cache_dir=cache_dir, log=lambda line: None)
    _, plain, _, _ = inference.predict_checkpoints(checkpoint, demo_dir / "eval", **kw)
    _, flipped, _, _ = inference.predict_checkpoints(checkpoint, mirrored, **kw)
    ids, tta, classes, layout = inference.predict_checkpoints(checkpoint, demo_dir / "eval", tta=True, **kw)
    _, tta_mirrored, _, _ = inference.predict_checkpoints(checkpoint, mirrored, tta=True, **kw)
    assert len(classes) == 18 and layout == "mask"
    # the same pixels go through the same batches, so equal means equal to rounding; a one-epoch net is
    # nearly uniform but not symmetric, so the mirror does move its probabilities (the test has teeth)
    assert np.abs(plain - flipped).max() > 1e-6
    assert np.allclose(tta, (plain + flipped) / 2, rtol=0, atol=1e-7)
    assert np.allclose(tta, tta_mirrored, rtol=0, atol=1e-7)


def test_soft_vote_of_two_designs(runs, demo_dir, cache_dir, tmp_path, capsys):
    # a single-head 64x48 model and a multi-head 48x32 model share the 18 classes: averaged per image
    common = ["--eval_dir", demo_dir / "eval", "--cache_dir", cache_dir, "--num_workers", 0, "--tta", "--batch_size", 5]
    for name in ("single", "multi"):
        assert run_cli(inference.cli, capsys, "--checkpoint", runs[name] / "best.pth", "--out", tmp_path / name, *common)[0] == 0
    code, out, err = run_cli(inference.cli, capsys, "--checkpoint", runs["single"] / "best.pth", runs["multi"] / "best.pth",
                             "--out", tmp_path / "both", *common)
    assert code == 0 and err == ""
    assert "soft vote of 2 checkpoints, flip TTA" in out and "multi_head" in out and "48x32" in out
    ids, both = soft_probs(tmp_path / "both" / "submission_soft.csv")
    _, single = soft_probs(tmp_path / "single" / "submission_soft.csv")
    _, multi = soft_probs(tmp_path / "multi" / "submission_soft.csv")
    assert np.allclose(both, (single + multi) / 2, atol=2e-6)
    assert np.allclose(both.sum(1), 1, atol=1e-4)
    answers = [int(r["ans"]) for r in read_csv(tmp_path / "both" / "submission.csv")]
    assert answers == both.argmax(1).tolist()


def test_folder_layout_writes_class_names(runs, tmp_path, capsys, cache_dir):
    code, _, err = run_cli(inference.cli, capsys, "--checkpoint", runs["folder"] / "best.pth", "--eval_dir", runs["colours"] / "test",
                           "--out", tmp_path / "out", "--cache_dir", cache_dir, "--num_workers", 0, "--device", "cpu")
    assert code == 0, err
    rows = read_csv(tmp_path / "out" / "submission.csv")
    assert [r["ImageID"] for r in rows] == ["a.png", "nested/b.png"]
    assert all(r["ans"] in ("2", "10", "green", "red") for r in rows)
    assert list(read_csv(tmp_path / "out" / "submission_soft.csv")[0]) == ["ImageID", "2", "10", "green", "red"]


REFUSALS = {
    "missing checkpoint": (lambda r, d, t: (["--checkpoint", t / "nope.pth", "--eval_dir", d / "eval"], "nope.pth: no such file")),
    "missing eval dir": (lambda r, d, t: (["--checkpoint", r["single"] / "best.pth", "--eval_dir", t / "nowhere"],
                                          "eval dir")),
    "not a checkpoint": (lambda r, d, t: (["--checkpoint", r["single"] / "history.csv", "--eval_dir", d / "eval"],
                                          "history.csv: not a PyTorch file")),
    "different classes": (lambda r, d, t: (["--checkpoint", r["single"] / "best.pth", r["folder"] / "best.pth", "--eval_dir", d / "eval"],
                                           "checkpoints disagree on classes")),
    "eval dir without info.csv": (lambda r, d, t: (["--checkpoint", r["single"] / "best.pth", "--eval_dir", d / "train"],
                                                   "no info.csv")),
    "batch size": (lambda r, d, t: (["--checkpoint", r["single"] / "best.pth", "--eval_dir", d / "eval", "--batch_size", 0],
                                    "--batch_size")),
    "unknown flag": (lambda r, d, t: (["--checkpoint", r["single"] / "best.pth", "--eval_dir", d / "eval", "--tta_views", 3],
                                      "--tta_views")),
    "no model key": (lambda r, d, t: (["--checkpoint", without_key(r["single"] / "best.pth", "model", t), "--eval_dir", d / "eval"],
                                      "not a train.py checkpoint (no model)")),
    "crafted checkpoint": (lambda r, d, t: (["--checkpoint", crafted_checkpoint(t / "evil.pth", t / "pwned"), "--eval_dir", d / "eval"],
                                            "refused: it holds Python objects")),
}


def without_key(path, key, tmp_path):
    ckpt = torch.load(path, weights_only=True)
    del ckpt[key]
    torch.save(ckpt, tmp_path / f"no_{key}.pth")
    return tmp_path / f"no_{key}.pth"


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_is_one_line_and_writes_nothing(case, runs, demo_dir, tmp_path, capsys):
    args, expected = REFUSALS[case](runs, demo_dir, tmp_path)
    code, _, err = run_cli(inference.cli, capsys, *args, "--out", tmp_path / "out", "--num_workers", 0)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and str(expected) in lines[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda(runs, demo_dir, tmp_path, capsys):
    code, _, err = run_cli(inference.cli, capsys, "--checkpoint", runs["single"] / "best.pth", "--eval_dir", demo_dir / "eval",
                           "--device", "cuda", "--out", tmp_path / "out")
    assert code == 1 and err == "inference.py: error: --device cuda: no CUDA device available\n"
    assert not (tmp_path / "out").exists()


def test_script_error_exit_code(runs, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "baseline" / "inference.py"), "--checkpoint", str(runs["single"] / "best.pth"),
                           "--eval_dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == f"inference.py: error: eval dir {tmp_path / 'nowhere'} does not exist or is not a directory\n"
    assert not (tmp_path / "out").exists()


def untrained_checkpoint(path, classes, layout):
    """A real checkpoint of an untrained BaseModel: what the layout checks and the decoder need, without training."""
    from model import create_model
    from training import checkpoint
    meta = dict(format=1, model="BaseModel", classification="single", head="", dropout=0.0, classes=classes, layout=layout,
                resize=[32, 32], mean=[0.5] * 3, std=[0.01] * 3, metric="accuracy", args={})  # inputs scaled up: outputs far apart
    torch.manual_seed(0)
    checkpoint.save(path, create_model("BaseModel", len(classes)), meta, epoch=1, best_metric=0.5)
    return path


def test_a_folder_checkpoint_on_a_mask_eval_dir_is_refused(demo_dir, tmp_path, capsys):
    # it used to predict every file under the dir as images/<id>, with info.csv ignored
    ckpt = untrained_checkpoint(tmp_path / "folder.pth", ["cat", "dog"], "folder")
    code, out, err = run_cli(inference.cli, capsys, "--checkpoint", ckpt, "--eval_dir", demo_dir / "eval", "--out", tmp_path / "out",
                             "--num_workers", 0)
    assert code == 1 and out == ""
    assert err == f"inference.py: error: eval dir {demo_dir / 'eval'} is of the mask layout (info.csv + images/), but checkpoint " \
                  f"{ckpt} (2 classes) is of the class-per-folder layout: give it a folder of images, or use a model trained on " \
                  f"the mask layout\n"
    assert not (tmp_path / "out").exists()


def test_photos_of_every_kind_are_predicted(tmp_path, capsys):
    # webp and bmp were left out of a folder eval dir; a 16-bit PNG was predicted as a white image
    ckpt = untrained_checkpoint(tmp_path / "folder.pth", ["cat", "dog"], "folder")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), (90, 20, 200)).save(photos / "a.webp", lossless=True)
    Image.new("RGB", (40, 30), (90, 20, 200)).save(photos / "b.bmp")
    Image.fromarray(np.full((30, 40), 4000, dtype=np.uint16)).save(photos / "c.png")
    Image.fromarray(np.full((30, 40), 255, dtype=np.uint8)).save(photos / "d.png")
    code, _, err = run_cli(inference.cli, capsys, "--checkpoint", ckpt, "--eval_dir", photos, "--out", tmp_path / "out",
                           "--num_workers", 0, "--cache_dir", tmp_path / "cache")
    assert code == 0, err
    ids, probs = soft_probs(tmp_path / "out" / "submission_soft.csv")
    assert ids == ["a.webp", "b.bmp", "c.png", "d.png"]
    assert np.allclose(probs[0], probs[1], atol=1e-5)  # the same picture in two formats
    assert np.abs(probs[2] - probs[3]).max() > 1e-4  # a dark grey 16-bit PNG is not white (both white: equal to the digit)


OUTS = {  # --out -> what the line says after it: each predicted every image, then a traceback
    "a file": (lambda t, ro: (t / "README.md").write_text("x") and t / "README.md", "a file, not a folder"),
    "under a file": (lambda t, ro: (t / "f").write_text("x") and t / "f" / "out", lambda t: f"cannot write there ({t / 'f'} is a file)"),
    "read-only": (lambda t, ro: ro() / "out", "cannot write there (Read-only file system)"),
}


@pytest.mark.parametrize("case", list(OUTS))
def test_an_out_that_cannot_be_written_is_one_line_before_predicting(case, demo_dir, tmp_path, capsys, request):
    ckpt = untrained_checkpoint(tmp_path / "m.pth", mask_class_names(), "mask")
    make, expected = OUTS[case]
    out = make(tmp_path, lambda: request.getfixturevalue("read_only_dir"))
    code, stdout, err = run_cli(inference.cli, capsys, "--checkpoint", ckpt, "--eval_dir", demo_dir / "eval", "--out", out,
                                "--cache_dir", tmp_path / "cache", "--num_workers", 0)
    expected = expected(tmp_path) if callable(expected) else expected
    assert (code, stdout, err) == (1, "", f"inference.py: error: --out {out}: {expected}\n")
    assert not (tmp_path / "cache").exists()  # not one image decoded
