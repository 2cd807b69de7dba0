"""imagedata/split.py: by person (profile), by image, k-fold, and the splits too small for the classes."""
import pytest

import dataset
from conftest import write_image
from imagedata.layouts import DataError, read_mask_train
from imagedata.split import split_by_profile


def test_profile_split_leaks_no_person(demo_dir):
    data = read_mask_train(demo_dir / "train")
    train, val = split_by_profile(data, 0.25, seed=3)
    assert not set(data["groups"][train]) & set(data["groups"][val])
    assert len(train) + len(val) == len(data["paths"])
    n_profiles = len(set(data["groups"]))
    assert abs(len(set(data["groups"][val])) - 0.25 * n_profiles) <= 3  # per-stratum rounding
    assert len(val) % 7 == 0


@pytest.mark.parametrize("k", [2, 3, 4])
def test_kfold_folds_disjoint_and_cover_all_profiles(demo_dir, k):
    data = read_mask_train(demo_dir / "train")
    val_profiles = []
    for fold in range(k):
        train, val = split_by_profile(data, 0.2, seed=0, kfold=k, fold=fold)
        assert not set(data["groups"][train]) & set(data["groups"][val])
        val_profiles.append(set(data["groups"][val]))
    union = set().union(*val_profiles)
    assert union == set(data["groups"])
    assert sum(len(v) for v in val_profiles) == len(union)


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
