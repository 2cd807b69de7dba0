"""dataset.py: the DATASETS and TRANSFORMS registries, read_split, and load_training_data's assembly."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dataset
from baseline import inference
from conftest import ROOT, make_profiles, run_cli, train_env
from core import demo
from training.checkpoint import load_model
from imagedata.decode import cache_key
from imagedata.layouts import DataError


@pytest.mark.parametrize("name", ["MaskSplitByProfileDataset", "MaskBaseDataset"])
@pytest.mark.parametrize("kfold", [0, 3])
def test_other_age_bounds_change_what_trains_not_the_truth_or_the_split(tmp_path, name, kfold):
    people = [(i, ("male", "female")[i % 2], (20, 45, 58, 59, 60, 75)[i % 6]) for i in range(36)]
    root = make_profiles(tmp_path, people)
    _, own, own_train, own_val = dataset.read_split(name, root, (30, 60), 0.25, seed=1, kfold=kfold, fold=1)
    _, moved, train, val = dataset.read_split(name, root, (30, 58), 0.25, seed=1, kfold=kfold, fold=1)
    assert list(train) == list(own_train) and list(val) == list(own_val)
    assert list(moved["truth"]) == list(own["truth"]) == list(own["labels"])
    is_58 = np.array(["_58/" in p or "_59/" in p for p in moved["paths"]])
    assert is_58.sum() == 12 * 7
    assert (moved["labels"][is_58] == own["labels"][is_58] + 1).all()  # middle band -> old band
    assert (moved["labels"][~is_58] == own["labels"][~is_58]).all()


@pytest.mark.parametrize("name", list(dataset.TRANSFORMS))
def test_transforms_batched_keep_shape_and_range(name):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 24), dtype=torch.uint8).float()
    transform = dataset.create_transform(name)
    y = transform(x) if transform else x
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 255
    if name != "base":  # a random draw per image: some change, and not all in the same way
        changed = [not torch.equal(a, b) for a, b in zip(x, y)]
        assert any(changed)
        assert len({round(float((a - b).abs().mean()), 3) for a, b in zip(x, y)}) > 1


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="flip_affine"):
        dataset.create_transform("rotate_everything")
    with pytest.raises(ValueError, match="ImageFolderDataset"):
        dataset.create_dataset("NoSuchDataset", ".")


def test_a_split_with_no_validation_people_is_refused(tmp_path):
    make_profiles(tmp_path, [(1, "male", 25), (2, "female", 40)])  # one person per stratum rounds to none at 0.2
    with pytest.raises(DataError, match="the split leaves no validation images \\(14 images, --val_ratio 0.2\\)"):
        dataset.read_split("MaskSplitByProfileDataset", tmp_path, (30, 60), 0.2, 0)


def test_an_unreadable_eval_image_stops_before_training(tmp_path, demo_dir):
    # it used to be found only by the prediction after training, when the checkpoints were written
    eval_dir = tmp_path / "eval"
    shutil.copytree(demo_dir / "eval", eval_dir)
    victim = sorted((eval_dir / "images").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:200])
    for use_cache in (True, False):
        with pytest.raises(DataError, match=f"cannot read image .*{victim.name}"):
            load(demo_dir / "train", eval_dir, tmp_path / "cache", use_cache=use_cache)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1  # the training images' cache only


def load(data_dir, eval_dir, cache_dir, dataset_name="MaskSplitByProfileDataset", use_cache=True, val_ratio=0.2, sampler="none"):
    return dataset.load_training_data(
        dataset=dataset_name, data_dir=data_dir, eval_dir=eval_dir, age_bounds=(30, 60), val_ratio=val_ratio, seed=0, kfold=0,
        fold=0, resize=(32, 24), augmentation="base", sampler=sampler, batch_size=8, valid_batch_size=8, num_workers=0,
        cache_dir=cache_dir, use_cache=use_cache, device=torch.device("cpu"))


@pytest.mark.parametrize("sampler", ["none", "weighted"])
def test_drawn_counts_are_what_the_epochs_really_draw(tmp_path, demo_dir, sampler):
    """weighted_cross_entropy weighs the classes as the training batches hold them: the real sampler's draws over
    many epochs match drawn_counts (the training counts, or equal shares under --sampler weighted)."""
    data = load(demo_dir / "train", None, tmp_path / "cache", sampler=sampler)
    seen = np.zeros(len(data.classes))
    epochs = 200
    for _ in range(epochs):
        for _, y in data.train_loader:
            seen += np.bincount(y.numpy(), minlength=len(data.classes))
    expected = data.drawn_counts / data.drawn_counts.sum()
    assert np.abs(seen / seen.sum() - expected).max() < 0.02
    present = data.class_counts > 0
    if sampler == "weighted":  # equal shares, though the training counts are far from equal
        assert np.ptp(data.drawn_counts[present]) == 0 and np.ptp(data.class_counts[present]) > 0
    else:
        assert np.array_equal(data.drawn_counts, data.class_counts)


def test_eval_images_are_cached_for_the_prediction_after_training(tmp_path, demo_dir):
    data = load(demo_dir / "train", demo_dir / "eval", tmp_path / "cache")
    (cached,) = [p for p in (tmp_path / "cache").glob("*.npy") if cache_key(data.eval_paths, data.resize) in p.name]
    assert np.load(cached).shape == (len(data.eval_paths), 32, 24, 3)


@pytest.mark.slow
def test_a_csv_data_set_trains_on_whole_writers_predicts_its_eval_csv_and_the_model_predicts_it_again(
        digits_csv, tmp_path, cache_dir, capsys):
    """train.py on labels in a CSV (ids without extension, words as labels, a writer column for the split), its eval
    a CSV of ids; then imgcls-inference on the checkpoint; then a fold of the CSV's own fold column."""
    common = ["--dataset", "CsvDataset", "--data_dir", digits_csv / "train", "--resize", "32", "32", "--batch_size", "32",
              "--num_workers", "0", "--cache_dir", cache_dir, "--model_dir", tmp_path, "--epochs", "2"]
    proc = subprocess.run([sys.executable, ROOT / "train.py", *map(str, common), "--eval_dir", str(digits_csv / "eval" / "test.csv"),
                           "--group_column", "writer", "--name", "grouped"], env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "grouped"
    classes = load_model(run / "best.pth")[1]["classes"]
    assert classes == sorted(demo.DIGITS)  # the labels, in natural order, in the checkpoint
    rows = pd.read_csv(digits_csv / "train" / "train.csv", dtype=str).set_index("image_id")
    val = pd.read_csv(run / "val_soft.csv", dtype=str)
    val_writers = set(rows.loc[[Path(i).stem for i in val["ImageID"]], "writer"])
    train_writers = set(rows.loc[~rows.index.isin([Path(i).stem for i in val["ImageID"]]), "writer"])
    assert val_writers and train_writers and not val_writers & train_writers  # each writer whole on one side
    test_ids = pd.read_csv(digits_csv / "eval" / "test.csv", dtype=str)["image_id"].tolist()
    submission = pd.read_csv(run / "submission.csv", dtype=str)
    assert submission["ImageID"].tolist() == test_ids and set(submission["ans"]) <= set(demo.DIGITS)

    code, out, err = run_cli(inference.cli, capsys, "--checkpoint", run / "best.pth", "--eval_dir", digits_csv / "eval" / "test.csv",
                             "--out", tmp_path / "again", "--num_workers", "0", "--cache_dir", cache_dir)
    assert code == 0, err
    assert pd.read_csv(tmp_path / "again" / "submission.csv", dtype=str).equals(submission)

    proc = subprocess.run([sys.executable, ROOT / "train.py", *map(str, common), "--fold_column", "fold", "--kfold", "5",
                           "--fold", "2", "--name", "fold2"], env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    held_out = {Path(i).stem for i in pd.read_csv(tmp_path / "fold2" / "val_soft.csv", dtype=str)["ImageID"]}
    assert held_out == set(rows.index[rows["fold"] == "2"])
