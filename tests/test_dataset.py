import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from core.labels import MASK_FILES
from dataset import DataError


def write_image(path, colour=(120, 80, 40), size=(48, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_profiles(root, people):
    """people: [(id, gender, age)] -> mask layout under root/images."""
    for pid, gender, age in people:
        for stem in MASK_FILES:
            write_image(root / "images" / f"{pid:06d}_{gender}_Asian_{age}" / f"{stem}.jpg")
    return root


def test_labels_cover_all_18_classes(tmp_path):
    people = [(i, g, a) for i, (g, a) in enumerate((g, a) for g in ("male", "female") for a in (20, 45, 70))]
    data = dataset.read_mask_train(make_profiles(tmp_path, people))
    assert sorted(set(data["labels"].tolist())) == list(range(18))
    by_path = dict(zip((Path(p).parent.name + "/" + Path(p).stem for p in data["paths"]), data["labels"]))
    assert by_path["000004_female_Asian_45/incorrect_mask"] == 1 * 6 + 1 * 3 + 1
    assert by_path["000002_male_Asian_70/normal"] == 2 * 6 + 0 * 3 + 2
    assert by_path["000003_female_Asian_20/mask3"] == 0 * 6 + 1 * 3 + 0
    assert len(data["classes"]) == 18 and data["classes"][11] == "incorrect_female_old"


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


def test_hidden_files_and_non_images_skipped(tmp_path):
    make_profiles(tmp_path, [(1, "male", 25)])
    folder = tmp_path / "images" / "000001_male_Asian_25"
    write_image(folder / "._mask1.jpg")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".hidden_dir").mkdir()
    data = dataset.read_mask_train(tmp_path)
    assert len(data["paths"]) == 7
    assert not any(Path(p).name.startswith(".") for p in data["paths"])


@pytest.mark.parametrize("name,message", [("abc_male_Asian", "malformed profile folder"), ("000001_robot_Asian_30", "malformed profile folder"),
                                          ("000001_male_Asian_old", "malformed profile folder"), ("000001_male_Asian_200", "out of range")])
def test_malformed_profile(tmp_path, name, message):
    write_image(tmp_path / "images" / name / "mask1.jpg")
    with pytest.raises(DataError, match=message):
        dataset.read_mask_train(tmp_path)


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_missing_or_empty_data_dir(tmp_path, make):
    with pytest.raises(DataError, match="does not exist|no images"):
        dataset.read_mask_train(make(tmp_path))


def test_profile_split_leaks_no_person(demo_dir):
    data = dataset.read_mask_train(demo_dir / "train")
    train, val = dataset.split_by_profile(data, 0.25, seed=3)
    assert not set(data["groups"][train]) & set(data["groups"][val])
    assert len(train) + len(val) == len(data["paths"])
    n_profiles = len(set(data["groups"]))
    assert abs(len(set(data["groups"][val])) - 0.25 * n_profiles) <= 3  # per-stratum rounding
    assert len(val) % 7 == 0


@pytest.mark.parametrize("k", [2, 3, 4])
def test_kfold_folds_disjoint_and_cover_all_profiles(demo_dir, k):
    data = dataset.read_mask_train(demo_dir / "train")
    val_profiles = []
    for fold in range(k):
        train, val = dataset.split_by_profile(data, 0.2, seed=0, kfold=k, fold=fold)
        assert not set(data["groups"][train]) & set(data["groups"][val])
        val_profiles.append(set(data["groups"][val]))
    union = set().union(*val_profiles)
    assert union == set(data["groups"])
    assert sum(len(v) for v in val_profiles) == len(union)


def test_folder_layout_natural_order(tmp_path):
    for name in ("10", "2", "1", "b", "a"):
        write_image(tmp_path / name / "x.png")
    write_image(tmp_path / "2" / "nested" / "y.jpg")
    data = dataset.read_folder_train(tmp_path)
    assert data["classes"] == ["1", "2", "10", "a", "b"]
    assert sorted(np.bincount(data["labels"]).tolist()) == [1, 1, 1, 1, 2]


def test_read_eval_mask_keeps_info_order(demo_dir):
    ids, paths = dataset.read_eval(demo_dir / "eval", "mask")
    listed = (demo_dir / "eval" / "info.csv").read_text().split()[1:]
    assert ids == [line.split(",")[0] for line in listed]
    assert all(os.path.isfile(p) for p in paths)


def test_read_eval_folder_nested_relative_ids(tmp_path):
    write_image(tmp_path / "b.jpg")
    write_image(tmp_path / "sub" / "deeper" / "a.png")
    (tmp_path / "sub" / ".DS_Store").write_bytes(b"x")
    ids, _ = dataset.read_eval(tmp_path, "folder")
    assert ids == ["b.jpg", "sub/deeper/a.png"]


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    good = tmp_path / "good.jpg"
    write_image(good)
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DataError, match="bad.jpg"):
        dataset.load_images([str(good), str(bad)], (32, 24), tmp_path / "cache")


def test_cache_built_once_shared_and_rebuilt_when_damaged_or_stale(tmp_path):
    paths = []
    for i in range(5):
        write_image(tmp_path / f"{i}.png", colour=(i * 40, 10, 200))
        paths.append(str(tmp_path / f"{i}.png"))
    cache = tmp_path / "cache"
    first = dataset.load_images(paths, (16, 12), cache)
    expected = np.array(first)  # a copy: the truncation below reaches into the mapping
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and isinstance(first, np.memmap)
    assert first[3, 0, 0].tolist() == [120, 10, 200]
    mtime = files[0].stat().st_mtime_ns
    again = dataset.load_images(paths, (16, 12), cache)
    assert files[0].stat().st_mtime_ns == mtime and np.array_equal(first, again)
    # damaged: truncated file is rebuilt, never trusted
    with open(files[0], "r+b") as f:
        f.truncate(files[0].stat().st_size - 10)
    rebuilt = dataset.load_images(paths, (16, 12), cache)
    assert np.array_equal(rebuilt, expected)
    # stale: an image changed on disk gives a new key and new content
    write_image(tmp_path / "3.png", colour=(0, 255, 0))
    os.utime(tmp_path / "3.png", ns=(mtime + 10**9, mtime + 10**9))
    fresh = dataset.load_images(paths, (16, 12), cache)
    assert fresh[3, 0, 0].tolist() == [0, 255, 0]
    assert dataset.load_images(paths, (16, 12), cache, use_cache=False) is None


def test_decode_centre_crops_to_aspect(tmp_path):
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 25, 50))  # blue left quarter is cropped away for a square target
    img.save(tmp_path / "wide.png")
    out = dataset.decode_image(tmp_path / "wide.png", (20, 20))
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert (out[:, :, 0] > 200).all()


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


def test_flip_mirrors_about_half_the_batch():
    torch.manual_seed(0)
    x = torch.arange(8.0).repeat(64, 3, 4, 1)
    y = dataset.RandomFlip()(x)
    flipped = [torch.equal(b, a.flip(2)) for a, b in zip(x, y)]
    assert all(f or torch.equal(a, b) for f, a, b in zip(flipped, x, y))
    assert 16 < sum(flipped) < 48


def test_affine_without_motion_is_identity():
    x = torch.rand(2, 3, 16, 12) * 255
    still = dataset.RandomAffine(degrees=0, translate=0, scale=(1, 1), flip=False)
    assert torch.allclose(still(x), x, atol=1e-3)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="flip_affine"):
        dataset.create_transform("rotate_everything")
    with pytest.raises(ValueError, match="ImageFolderDataset"):
        dataset.create_dataset("NoSuchDataset", ".")


def test_normalize_uses_mean_std():
    norm = dataset.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(norm(x), torch.full((1, 3, 2, 2), 2.0))


def build_cache(args):
    paths, cache = args
    images = dataset.load_images(paths, (16, 12), cache)
    return int(images.sum()), images.filename


@pytest.mark.slow
def test_trials_starting_together_share_one_cache(tmp_path):
    import multiprocessing

    paths = []
    for i in range(40):
        write_image(tmp_path / f"{i}.png", colour=(i * 6, 255 - i * 6, 7))
        paths.append(str(tmp_path / f"{i}.png"))
    cache = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(build_cache, [(paths, cache)] * 3)
    assert len({r[0] for r in results}) == 1 and len({r[1] for r in results}) == 1
    assert [p.suffix for p in cache.iterdir() if p.suffix != ".lock"] == [".npy"]
    assert results[0][0] == int(np.stack([dataset.decode_image(p, (16, 12)) for p in paths]).sum())


def test_zero_byte_cache_file_is_rebuilt(tmp_path):
    paths = []
    for i in range(3):
        write_image(tmp_path / f"{i}.png", colour=(i * 60, 30, 90))
        paths.append(str(tmp_path / f"{i}.png"))
    first = np.array(dataset.load_images(paths, (16, 12), tmp_path / "cache"))
    (cache_file,) = (tmp_path / "cache").glob("*.npy")
    cache_file.write_bytes(b"")
    assert np.array_equal(dataset.load_images(paths, (16, 12), tmp_path / "cache"), first)


def test_one_class_folder_set_is_refused(tmp_path):
    write_image(tmp_path / "only" / "a.png")
    write_image(tmp_path / "only" / "b.png")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="1 class \\(only\\): a classifier needs at least 2"):
        dataset.read_folder_train(tmp_path)
