"""The train/validation splits: by image (random), by person (profile) or group, by a CSV's own folds, and their k-fold
versions."""
import math

import numpy as np

from imagedata.layouts import DataError


def split_random(data, val_ratio, seed, kfold=0, fold=0):
    """Image-level split (a person's photos may straddle train and validation)."""
    from sklearn.model_selection import StratifiedKFold, train_test_split  # lazy: 1 s of start-up

    index = np.arange(len(data["truth"]))
    counts = np.bincount(data["truth"])
    if kfold:
        if kfold > counts.max():  # sklearn's own line would not name the flag
            raise DataError(f"--kfold {kfold}: no class has {kfold} images (the largest has {counts.max()}), so no fold can be "
                            f"stratified; use --kfold {max(counts.max(), 2)} or less, or --val_ratio")
        return list(StratifiedKFold(kfold, shuffle=True, random_state=seed).split(index, data["truth"]))[fold]
    stratify = data["truth"] if counts[counts > 0].min() >= 2 else None
    if stratify is not None:
        check_stratified_split(len(index), int((counts > 0).sum()), val_ratio)
    return train_test_split(index, test_size=val_ratio, random_state=seed, stratify=stratify)


def check_stratified_split(images, classes, val_ratio):
    """A stratified split puts one image of every class on each side: say which --val_ratio can, in one line
    (sklearn's "test_size = ... should be greater or equal to the number of classes" names no flag)."""
    val = math.ceil(val_ratio * images)  # as train_test_split rounds
    lowest, highest = math.ceil(100 * classes / images) / 100, math.floor(100 * (images - classes) / images) / 100
    if val < classes:
        raise DataError(f"--val_ratio {val_ratio} puts {val} of {images} images in validation, fewer than the {classes} classes: "
                        f"a stratified split needs one image of each class there; use --val_ratio {lowest:g} or more, or --kfold K")
    if images - val < classes:
        raise DataError(f"--val_ratio {val_ratio} leaves {images - val} of {images} images for training, fewer than the {classes} "
                        f"classes: a stratified split needs one image of each class there; use --val_ratio {highest:g} or less, "
                        f"or --kfold K")


def split_by_profile(data, val_ratio, seed, kfold=0, fold=0):
    """No person in both train and validation; validation profiles drawn without
    replacement, stratified by gender x age band (or StratifiedGroupKFold)."""
    groups, strata = data["groups"], data["strata"]
    if kfold:
        from sklearn.model_selection import StratifiedGroupKFold
        splitter = StratifiedGroupKFold(kfold, shuffle=True, random_state=seed)
        return list(splitter.split(groups, strata, groups))[fold]
    rng = np.random.default_rng(seed)
    profile_ids = np.unique(groups)
    profile_strata = np.array([strata[groups == g][0] for g in profile_ids])
    val_profiles = []
    for s in np.unique(profile_strata):
        members = profile_ids[profile_strata == s]
        take = int(round(len(members) * val_ratio))
        val_profiles += list(rng.choice(members, size=take, replace=False))
    is_val = np.isin(groups, val_profiles)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def split_by_columns(data, val_ratio, seed, kfold=0, fold=0):
    """A CSV data set's split: its fold column's folds (with --kfold), else whole groups of its group column (as
    people are kept whole), else by image."""
    if "folds" in data:
        names = data["fold_names"]
        if kfold != len(names):
            raise DataError(f"--fold_column {data['fold_column']} holds {len(names)} folds ({', '.join(names[:5])}"
                            f"{', ...' if len(names) > 5 else ''}): use --kfold {len(names)} --fold 0..{len(names) - 1}")
        return np.flatnonzero(data["folds"] != fold), np.flatnonzero(data["folds"] == fold)
    if "grouped" in data:
        groups = len(np.unique(data["groups"]))
        if kfold > groups:
            raise DataError(f"--kfold {kfold}: --group_column {data['grouped']} has {groups} groups, fewer than the folds")
        return split_by_profile(data, val_ratio, seed, kfold, fold)
    return split_random(data, val_ratio, seed, kfold, fold)
