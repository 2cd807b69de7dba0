import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from conftest import ROOT, train_env
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


# ----------------------------------------------------------------------------- real photos and real folders (issue 21)
def channel_means(array):
    return array.reshape(-1, 3).mean(0)


def test_16_bit_png_keeps_its_grey(tmp_path):
    # mode I;16: convert("RGB") alone clipped every value over 255 to white
    grey = np.full((40, 30), 30000, dtype=np.uint16)
    grey[:, :15] = 5000
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    out = dataset.decode_image(tmp_path / "grey16.png", (40, 30))
    assert out.shape == (40, 30, 3) and (out[:, :, 0] == out[:, :, 1]).all()
    assert abs(int(out[20, 5, 0]) - round(5000 / 257)) <= 1 and abs(int(out[20, 25, 0]) - round(30000 / 257)) <= 1


def test_exif_orientation_turns_a_phone_photo_upright(tmp_path):
    # stored landscape with the top of the scene at the left; Orientation 6 says: turn 90 degrees clockwise to view
    stored = Image.new("RGB", (80, 40), (200, 0, 0))
    stored.paste((0, 0, 200), (0, 0, 20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = dataset.decode_image(tmp_path / "phone.jpg", (80, 40))  # (H, W): portrait, as the phone showed it
    top, bottom = channel_means(out[:10]), channel_means(out[-30:])
    assert top[2] > 150 and top[0] < 60 and bottom[0] > 150 and bottom[2] < 60


def test_every_mode_becomes_rgb_as_seen(tmp_path):
    rgb = (40, 160, 90)
    Image.new("RGB", (32, 32), rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    palette = Image.new("RGB", (32, 32), rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = palette.getpixel((0, 0))  # every pixel transparent: what shows is the background
    palette.save(tmp_path / "palette.png")
    Image.new("LA", (32, 32), (0, 0)).save(tmp_path / "grey_alpha.png")
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "rgba.webp", lossless=True)
    Image.new("RGB", (32, 32), rgb).save(tmp_path / "plain.tif")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK" and Image.open(tmp_path / "palette.png").mode == "P"
    assert np.abs(channel_means(dataset.decode_image(tmp_path / "cmyk.jpg", (16, 16))) - rgb).max() < 6
    assert np.abs(channel_means(dataset.decode_image(tmp_path / "plain.tif", (16, 16))) - rgb).max() < 1
    for transparent in ("palette.png", "grey_alpha.png", "rgba.webp"):  # was black: the colour stored under alpha 0
        assert (dataset.decode_image(tmp_path / transparent, (16, 16)) == 255).all(), transparent


def test_webp_bmp_tiff_are_read_in_both_layouts_and_eval(tmp_path):
    people = make_profiles(tmp_path / "mask", [(1, "female", 30)])
    normal = people / "images" / "000001_female_Asian_30" / "normal.jpg"
    Image.open(normal).save(normal.with_suffix(".webp"))
    normal.unlink()
    assert len(dataset.read_mask_train(people)["paths"]) == 7
    for ext in ("webp", "bmp", "tif", "tiff", "gif"):
        write_image(tmp_path / "folder" / ("a" if ext < "m" else "b") / f"x.{ext}")
        write_image(tmp_path / "eval" / f"x.{ext}")
    assert len(dataset.read_folder_train(tmp_path / "folder")["paths"]) == 5
    assert sorted(dataset.read_eval(tmp_path / "eval", "folder")[0]) == ["x.bmp", "x.gif", "x.tif", "x.tiff", "x.webp"]


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


def load(data_dir, eval_dir, cache_dir, dataset_name="MaskSplitByProfileDataset", use_cache=True, val_ratio=0.2):
    return dataset.load_training_data(
        dataset=dataset_name, data_dir=data_dir, eval_dir=eval_dir, age_bounds=(30, 60), val_ratio=val_ratio, seed=0, kfold=0,
        fold=0, resize=(32, 24), augmentation="base", sampler="none", batch_size=8, valid_batch_size=8, num_workers=0,
        cache_dir=cache_dir, use_cache=use_cache, device=torch.device("cpu"))


def test_eval_images_are_cached_for_the_prediction_after_training(tmp_path, demo_dir):
    data = load(demo_dir / "train", demo_dir / "eval", tmp_path / "cache")
    (cached,) = [p for p in (tmp_path / "cache").glob("*.npy") if dataset.cache_key(data.eval_paths, data.size) in p.name]
    assert np.load(cached).shape == (len(data.eval_paths), 32, 24, 3)


def test_one_person_in_two_folders_is_refused(tmp_path):
    make_profiles(tmp_path, [(7, "female", 30), (8, "male", 40)])
    write_image(tmp_path / "images" / "000007_female_Korean_30" / "mask1.jpg")
    with pytest.raises(DataError, match="profile id 000007 names two folders, .*000007_female_Asian_30 and .*000007_female_Korean_30"):
        dataset.read_mask_train(tmp_path)


def write_train_csv(root, rows, header="id,gender,race,age,path", bom=False):
    text = "\n".join([header, *(",".join(map(str, row)) for row in rows)]) + "\n"
    (root / "train.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())


def test_train_csv_is_only_checked_against_the_folders(tmp_path, capsys):
    make_profiles(tmp_path, [(1, "male", 25), (2, "female", 61)])
    labels = dataset.read_mask_train(tmp_path)["labels"]
    assert capsys.readouterr().err == ""  # no train.csv: fine
    write_train_csv(tmp_path, [("000001", "male", "Asian", 25, "000001_male_Asian_25"),
                               ("000002", "female", "Asian", 61, "000002_female_Asian_61")], bom=True)
    dataset.read_mask_train(tmp_path / "images")  # DATA/train/images finds DATA/train/train.csv too
    assert capsys.readouterr().err == ""
    write_train_csv(tmp_path, [("000001", "male", "Asian", 52, "000001_male_Asian_25"),
                               ("000003", "male", "Asian", 33, "000003_male_Asian_33")])
    data = dataset.read_mask_train(tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {tmp_path / 'train.csv'} does not match the profile folders"), lines
    assert "listed without a folder: 1 (e.g. 000003_male_Asian_33)" in lines[0]
    assert "folders not listed: 1 (e.g. 000002_female_Asian_61)" in lines[0]
    assert "differ from the folder name: 1 (e.g. 000001_male_Asian_25)" in lines[0]
    assert list(data["labels"]) == list(labels)  # the folders still say what trains
    write_train_csv(tmp_path, [(1, "000001_male_Asian_25")], header="id,folder")
    dataset.read_mask_train(tmp_path)
    assert capsys.readouterr().err == f"warning: {tmp_path / 'train.csv'}: no gender column (its header: id,folder): not checked " \
                                      f"against the profile folders\n"


def test_symlinked_folders_are_followed_once_without_looping(tmp_path):
    photos = tmp_path / "photos"
    write_image(photos / "cat_1.jpg")
    write_image(photos / "deeper" / "cat_2.png")
    write_image(tmp_path / "data" / "cat" / "own.jpg")
    (tmp_path / "data" / "cat" / "linked").symlink_to(photos, target_is_directory=True)
    (photos / "deeper" / "back_up").symlink_to(photos, target_is_directory=True)  # a loop
    write_image(tmp_path / "data" / "dog" / "d.jpg")
    data = dataset.read_folder_train(tmp_path / "data")
    names = sorted(Path(p).name for p in data["paths"])
    assert names == ["cat_1.jpg", "cat_2.png", "d.jpg", "own.jpg"]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "batch1").symlink_to(photos, target_is_directory=True)
    assert dataset.read_eval(tmp_path / "eval", "folder")[0] == ["batch1/cat_1.jpg", "batch1/deeper/cat_2.png"]


def test_empty_class_folder_is_left_out_with_a_warning(tmp_path, capsys):
    write_image(tmp_path / "cat" / "a.jpg")
    write_image(tmp_path / "dog" / "b.jpg")
    (tmp_path / "emu").mkdir()
    (tmp_path / "heic_only").mkdir()
    (tmp_path / "heic_only" / "IMG_0001.HEIC").write_bytes(b"\0")
    data = dataset.read_folder_train(tmp_path)
    assert data["classes"] == ["cat", "dog"] and list(data["labels"]) == [0, 1]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: left out 2 of 4 class folders in {tmp_path}, which hold no images: "
                                                   f"emu, heic_only (images are .bmp .gif .jpeg .jpg .png .tif .tiff .webp)"), err


@pytest.mark.parametrize("content,message", [
    (b"\xef\xbb\xbfImageID,ans\nb.jpg,0\na.jpg,0\n", None),  # Excel's "CSV UTF-8"
    (b"image,ans\nb.jpg,0\n", "info.csv: no ImageID column (its header: image,ans)"),
    (b"", "info.csv: no ImageID column (its header: none)"),
    (b"ImageID,ans\n\xff\xfeb.jpg,0\n", "info.csv: not a UTF-8 CSV"),
])
def test_info_csv_with_a_bom_is_read_and_a_missing_column_named(tmp_path, content, message):
    write_image(tmp_path / "images" / "a.jpg")
    write_image(tmp_path / "images" / "b.jpg")
    (tmp_path / "info.csv").write_bytes(content)
    if message is None:
        assert dataset.read_eval(tmp_path, "mask")[0] == ["b.jpg", "a.jpg"]
    else:
        with pytest.raises(DataError, match=re.escape(message)):
            dataset.read_eval(tmp_path, "mask")


def test_a_mask_eval_dir_is_refused_for_a_folder_model(tmp_path, demo_dir):
    with pytest.raises(DataError, match=f"eval dir {demo_dir / 'eval'} is of the mask layout .*, but checkpoint x.pth is of the "
                                        "class-per-folder layout"):
        dataset.read_eval(demo_dir / "eval", "folder", "checkpoint x.pth")
    with pytest.raises(DataError, match="has no info.csv: --dataset MaskBaseDataset is of the mask layout"):
        dataset.read_eval(demo_dir / "train", "mask", "--dataset MaskBaseDataset")


def many_classes(root, classes, per_class):
    for c in range(classes):
        for i in range(per_class):
            write_image(root / f"c{c}" / f"{i}.png", size=(4, 4))
    return root


@pytest.mark.parametrize("val_ratio,kfold,message", [
    (0.2, 0, "--val_ratio 0.2 puts 12 of 60 images in validation, fewer than the 20 classes: a stratified split needs one image "
             "of each class there; use --val_ratio 0.34 or more, or --kfold K"),
    (0.8, 0, "--val_ratio 0.8 leaves 12 of 60 images for training, fewer than the 20 classes: .* use --val_ratio 0.66 or less"),
    (0.2, 4, "--kfold 4: no class has 4 images \\(the largest has 3\\), so no fold can be stratified; use --kfold 3 or less"),
])
def test_a_split_too_small_for_the_classes_names_the_flag(tmp_path, val_ratio, kfold, message):
    root = many_classes(tmp_path, 20, 3)
    with pytest.raises(DataError, match=message):
        dataset.read_split("ImageFolderDataset", root, (30, 60), val_ratio, 0, kfold)
    if not kfold:  # the ratio it names works
        suggested = float(message.split("use --val_ratio ")[1].split()[0])
        _, _, train, val = dataset.read_split("ImageFolderDataset", root, (30, 60), suggested, 0)
        assert len(val) >= 20 and len(train) >= 20


def test_a_split_with_no_validation_people_is_refused(tmp_path):
    make_profiles(tmp_path, [(1, "male", 25), (2, "female", 40)])  # one person per stratum rounds to none at 0.2
    with pytest.raises(DataError, match="the split leaves no validation images \\(14 images, --val_ratio 0.2\\)"):
        dataset.read_split("MaskSplitByProfileDataset", tmp_path, (30, 60), 0.2, 0)


def test_stale_cache_temp_files_are_removed_and_live_ones_kept(tmp_path):
    import fcntl
    import time

    paths = []
    for i in range(3):
        write_image(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    cache = tmp_path / "cache"
    cache.mkdir()
    own_key, other_key, live_key = dataset.cache_key(paths, (16, 12)), "0" * 20, "1" * 20
    stale = [cache / f"{own_key}.abc.npy.tmp", cache / f"{other_key}.def.npy.tmp", cache / "tmpold.npy.tmp"]
    for tmp in stale:
        tmp.write_bytes(b"\0" * 1024)
    (cache / f"{other_key}.lock").touch()  # a lock file nobody holds: its build died
    old = time.time() - 7200
    os.utime(cache / "tmpold.npy.tmp", (old, old))
    live = [cache / f"{live_key}.ghi.npy.tmp", cache / "tmpfresh.npy.tmp"]
    for tmp in live:
        tmp.write_bytes(b"\0")
    with open(cache / f"{live_key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build running now
        dataset.load_images(paths, (16, 12), cache)
        assert not any(p.exists() for p in stale) and all(p.exists() for p in live)


CACHE_BUILDER = """
import sys, time
import dataset
paths = sys.argv[2:]
def slow(items):
    for i, item in enumerate(items):
        if i == 1:
            print("building", flush=True)
            time.sleep(60)
        yield item
dataset.load_images(paths, (16, 12), sys.argv[1], progress=slow)
"""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_cache_build_leaves_no_temp_file_behind(tmp_path, signum):
    paths = []
    for i in range(3):
        write_image(tmp_path / f"{i}.png", colour=(i * 50, 0, 0))
        paths.append(str(tmp_path / f"{i}.png"))
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", CACHE_BUILDER, str(cache), *paths], cwd=ROOT, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "building\n", proc.stderr.read()
    assert len(list(cache.glob("*.npy.tmp"))) == 1  # the build's own, full-size from the start
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    if signum == signal.SIGTERM:  # caught: the builder removes its own temp file, and the exit says which signal
        assert proc.returncode == 128 + signal.SIGTERM and err == "" and not list(cache.glob("*.npy.tmp"))
    else:  # not catchable: the next build removes it
        assert proc.returncode == -signal.SIGKILL and len(list(cache.glob("*.npy.tmp"))) == 1
    images = dataset.load_images(paths, (16, 12), cache)
    assert images[2, 0, 0].tolist() == [100, 0, 0] and not list(cache.glob("*.npy.tmp"))


def test_a_cache_from_the_old_decoder_is_not_read(tmp_path, monkeypatch):
    # the key once held only the paths, their stat and the size: a cache of sideways photos would have been kept
    write_image(tmp_path / "a.png")
    paths = [str(tmp_path / "a.png")]
    key = dataset.cache_key(paths, (16, 12))
    monkeypatch.setattr(dataset, "DECODER_VERSION", dataset.DECODER_VERSION - 1)
    assert dataset.cache_key(paths, (16, 12)) != key


GIB = 2**30
FEED_CASES = {  # (requested, image bytes (None: --no_cache), device, free bytes) -> (feed, words in its line)
    "fits on the GPU": (("auto", 1 * GIB, "cuda", 10 * GIB), ("device", "1.0 GiB of decoded images copied to cuda once")),
    "half of free memory still fits": (("auto", 5 * GIB, "cuda", 10 * GIB), ("device", "up to 50% of it for images")),
    "too big for the GPU": (("auto", 6 * GIB, "cuda", 10 * GIB), ("loader", "would not fit: 10.0 GiB free on cuda")),
    "forced onto the GPU": (("device", 6 * GIB, "cuda", 10 * GIB), ("device", "--feed device")),
    "asked for the loader": (("loader", 1 * GIB, "cuda", 10 * GIB), ("loader", "--feed loader")),
    "no cache": (("auto", None, "cuda", 10 * GIB), ("loader", "no cache")),
    "CPU: the cache itself": (("auto", 200 * 2**20, "cpu", None), ("device", "the 200 MiB cache, memory-mapped")),
}


@pytest.mark.parametrize("case", FEED_CASES)
def test_feed_fits_on_the_device_or_falls_back(case):
    (requested, image_bytes, device, free), (feed, words) = FEED_CASES[case]
    chosen, line = dataset.choose_feed(requested, image_bytes, torch.device(device), free)
    assert chosen == feed and words in line and "\n" not in line, line


@pytest.mark.parametrize("image_bytes, free, words", [(None, None, "needs the decoded-image cache"),
                                                       (12 * GIB, 10 * GIB, "12.0 GiB of decoded images do not fit in the 10.0 GiB free")])
def test_a_device_feed_that_cannot_work_is_refused(image_bytes, free, words):
    with pytest.raises(ValueError, match=words):
        dataset.choose_feed("device", image_bytes, torch.device("cuda" if free else "cpu"), free)


@pytest.mark.parametrize("sampler", ["none", "weighted"])
def test_device_feed_gives_the_loaders_batches(tmp_path, demo_dir, sampler):
    """Same seed, same batches, and the same random streams after them (augmentation draws from the global one)."""
    def epochs(feed):
        torch.manual_seed(5)
        data = dataset.load_training_data(
            dataset="MaskSplitByProfileDataset", data_dir=demo_dir / "train", eval_dir=None, age_bounds=(30, 60), val_ratio=0.2,
            seed=3, kfold=0, fold=0, resize=(32, 24), augmentation="base", sampler=sampler, batch_size=16, valid_batch_size=20,
            num_workers=0, cache_dir=tmp_path / "cache", use_cache=True, device=torch.device("cpu"), feed=feed)
        batches = [batch for _ in range(2) for loader in (data.train_loader, data.val_loader) for batch in loader]
        return data, batches, torch.rand(4), [g.get_state() for g in data.generators]

    (loader, want, *want_rng), (device, got, *got_rng) = epochs("loader"), epochs("device")
    assert (loader.feed, device.feed, device.workers) == ("loader", "device", 0)
    assert len(got) == len(want) > 4
    for (x, y), (wx, wy) in zip(got, want):
        assert x.dtype == wx.dtype == torch.uint8 and x.is_contiguous()
        assert torch.equal(x, wx) and torch.equal(y, wy)
    assert torch.equal(got_rng[0], want_rng[0])
    assert all(torch.equal(a, b) for a, b in zip(got_rng[1], want_rng[1]))
