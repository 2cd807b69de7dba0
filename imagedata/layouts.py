"""The two layouts a data dir is read in, and the eval dir:
  mask   DATA/train/images/{id}_{gender}_{race}_{age}/{mask1..5,incorrect_mask,normal}.jpg
         (+ DATA/train/train.csv) and DATA/eval/info.csv + DATA/eval/images/
  folder DATA/<class>/<image>, eval = every image under a folder (nested allowed)
Each reader returns dict(paths, labels, truth, groups, strata, classes); DataError on bad input.
"""
import csv
import os
import sys
from pathlib import Path

import numpy as np

from core.labels import (DEFAULT_AGE_BOUNDS, GENDERS, MASK_FILES, age_band, encode_class, formula_like, mask_class_names,
                         natural_key)
from imagedata.constants import IMAGE_EXTENSIONS


class DataError(Exception):
    """Bad input data: main() prints the message as one line and exits non-zero."""


def warn(line):
    print(f"warning: {line}", file=sys.stderr, flush=True)


def is_image(path):
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def shown(path):
    """A path as text that names it even when its bytes are not UTF-8 (those bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8_named(path):
    """path, or DataError naming it when its name is not UTF-8: the run's CSV and JSON files could not hold it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{shown(path)}: its name is not UTF-8 text, which the run's CSV and JSON files cannot hold; "
                        f"rename it") from None
    return path


def image_files(root):
    """Every image under root at any depth, hidden folders left out, each real file once. Symlinked folders are
    followed (a class folder made of links to where the photos live), each real folder once, so a link back up
    cannot loop."""
    seen, found, real = set(), [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in (Path(folder) / name for name in sorted(files)):
            if is_image(file) and (target := os.path.realpath(file)) not in real:
                real.add(target)
                found.append(utf8_named(file))
    return found


def check_one_label(paths, root, what):
    """One image, one label: DataError when a real file is reached twice (a link into another class folder or
    person, or up to the data dir), since it would train under two labels and sit on both sides of the split; one
    warning line for links that leave root (fine when meant: a class folder of links to where photos live)."""
    owner, outside, inside = {}, [], os.path.realpath(root) + os.sep
    for path in paths:
        real = os.path.realpath(path)
        if real in owner:
            raise DataError(f"{real} is reached as {owner[real]} and as {path}: one image under two {what}; remove the "
                            f"link that reaches it twice")
        owner[real] = path
        if not real.startswith(inside):
            outside.append((path, real))
    if outside:
        warn(f"{len(outside)} of {len(paths)} images under {root} are links to files outside it (e.g. {outside[0][0]} -> "
             f"{outside[0][1]}): they train as if they were there")


def parse_profile(name):
    """'000123_female_Asian_45' -> (id, gender, age); DataError if malformed."""
    parts = name.split("_")
    if len(parts) != 4 or parts[1] not in GENDERS or not parts[3].isdigit():
        raise DataError(f"malformed profile folder name {name!r}: expected {{id}}_{{male|female}}_{{race}}_{{age}}")
    age = int(parts[3])
    if not 0 < age < 130:
        raise DataError(f"profile folder {name!r}: age {age} out of range")
    return parts[0], GENDERS[parts[1]], age


def check_dir(path, what):
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist or is not a directory")
    return path


def read_mask_train(data_dir, age_bounds=DEFAULT_AGE_BOUNDS):
    """Mask layout -> dict(paths, labels, truth, groups, strata, classes). Accepts DATA/train or DATA/train/images.
    labels: what the model trains on (age_bounds); truth: the data's own labels (DEFAULT_AGE_BOUNDS), which
    validation is scored on and the strata use, so that the split is the same whatever the age_bounds."""
    root = check_dir(data_dir, "data dir")
    image_root = root / "images" if (root / "images").is_dir() else root
    paths, labels, truth, groups, strata = [], [], [], [], []
    profiles = sorted((p for p in image_root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: natural_key(p.name))
    owners = {}  # profile id -> its folder: the split groups by folder, so one person in two folders would straddle it
    for group, profile in enumerate(profiles):
        pid, gender, age = parse_profile(profile.name)
        if pid in owners:
            raise DataError(f"profile id {pid} names two folders, {owners[pid]} and {profile}: one person's photos would be "
                            f"split between training and validation; merge them or give one another id")
        owners[pid] = profile
        for file in sorted(profile.iterdir()):
            if not is_image(file) or file.stem not in MASK_FILES:
                continue
            paths.append(str(utf8_named(file)))
            labels.append(encode_class(MASK_FILES[file.stem], gender, age_band(age, age_bounds)))
            truth.append(encode_class(MASK_FILES[file.stem], gender, age_band(age)))
            groups.append(group)
            strata.append(gender * 3 + age_band(age))
    if not paths:
        raise DataError(f"no images found in {image_root} (expected {{id}}_{{gender}}_{{race}}_{{age}}/mask1.jpg ...)")
    check_one_label(paths, image_root, "people")
    check_train_csv((image_root.parent if image_root.name == "images" else image_root) / "train.csv", profiles)
    return dict(paths=paths, labels=np.array(labels), truth=np.array(truth), groups=np.array(groups), strata=np.array(strata),
                classes=mask_class_names())


def check_train_csv(path, profiles):
    """train.csv (id,gender,race,age,path) is only checked, never read: the folder names are the labels. A
    deleted, stale or hand-edited one is worth a warning, not a stop; a missing one is fine."""
    if not path.is_file():
        return
    try:
        rows = read_csv_rows(path, ("id", "gender", "race", "age", "path"))
    except DataError as e:
        return warn(f"{e}: not checked against the profile folders")
    fields = ("id", "gender", "race", "age")
    listed = {Path(row["path"] or "").name: "_".join(row[k] or "" for k in fields) for row in rows}  # short rows hold None
    folders = {p.name for p in profiles}
    problems = [(what, names) for what, names in (
        ("listed without a folder", sorted(set(listed) - folders)),
        ("folders not listed", sorted(folders - set(listed))),
        ("rows whose id,gender,race,age differ from the folder name", sorted(p for p in folders & set(listed) if listed[p] != p)))
        if names]
    if problems:
        warn(f"{path} does not match the profile folders, which are what trains (it is only checked): "
             + "; ".join(f"{what}: {len(names)} (e.g. {names[0]})" for what, names in problems))


def read_folder_train(data_dir, age_bounds=None):
    """Class-per-folder layout; classes in natural order. A class folder without images is left out with a
    warning: as a class it could never be predicted right, and macro F1 would stop at (K-1)/K."""
    root = check_dir(data_dir, "data dir")
    folders = sorted((utf8_named(p).name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural_key)
    found = {name: sorted(image_files(root / name), key=lambda f: natural_key(f.name)) for name in folders}
    classes = [name for name in folders if found[name]]
    formula = [name for name in classes if formula_like(name)]
    if formula:  # as a class name it becomes submission.csv's answers, which a spreadsheet would run
        raise DataError(f"class folder {root / formula[0]}: its name starts as a spreadsheet formula; rename it")
    paths, labels = [], []
    for index, name in enumerate(classes):
        paths += [str(f) for f in found[name]]
        labels += [index] * len(found[name])
    if not paths:
        raise DataError(f"no images found in {root} (expected {root}/<class>/<image>.jpg)")
    if len(classes) < 2:
        raise DataError(f"{root} holds images of {len(classes)} class ({', '.join(classes)}): a classifier needs at least 2 "
                        f"class folders with images")
    check_one_label(paths, root, "classes")
    empty = [name for name in folders if not found[name]]
    if empty:
        warn(f"left out {len(empty)} of {len(folders)} class folders in {root}, which hold no images: {', '.join(empty[:5])}"
             f"{', ...' if len(empty) > 5 else ''} (images are {' '.join(sorted(IMAGE_EXTENSIONS))})")
    labels = np.array(labels)
    return dict(paths=paths, labels=labels, truth=labels, groups=np.arange(len(paths)), strata=labels, classes=classes)


def read_eval(eval_dir, layout, model="the model"):
    """-> (image_ids, paths). Mask layout keeps info.csv order; folder layout ids are relative paths.
    model: what reads the eval dir, for the line that refuses a dir of the other layout."""
    root = check_dir(eval_dir, "eval dir")
    is_mask_dir = (root / "info.csv").is_file() and (root / "images").is_dir()
    if layout == "mask":
        if not (root / "info.csv").is_file():
            raise DataError(f"eval dir {root} has no info.csv: {model} is of the mask layout, whose eval dir holds "
                            f"info.csv (ImageID,ans) and images/")
        ids = [row["ImageID"] for row in read_csv_rows(root / "info.csv", ["ImageID"])]
        outside = [i for i in ids if Path(i).is_absolute() or ".." in Path(i).parts]
        if outside:  # read, it would predict an image from elsewhere (the training data, say) as an eval image
            raise DataError(f"{root / 'info.csv'}: ImageID {outside[0]!r} is not a file name under {root / 'images'}")
        paths = [str(root / "images" / i) for i in ids]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{len(missing)} images listed in {root / 'info.csv'} are missing, e.g. {missing[0]}")
    elif is_mask_dir:  # read as a folder, its images would be predicted under ids images/<id>, and info.csv ignored
        raise DataError(f"eval dir {root} is of the mask layout (info.csv + images/), but {model} is of the class-per-folder "
                        f"layout: give it a folder of images, or use a model trained on the mask layout")
    else:
        files = sorted(image_files(root), key=lambda f: natural_key(f.relative_to(root).as_posix()))
        ids, paths = [f.relative_to(root).as_posix() for f in files], [str(f) for f in files]
    if not ids:
        raise DataError(f"eval dir {root} holds no images")
    return ids, paths


def read_csv_rows(path, columns):
    """A CSV -> its rows as dicts; DataError naming the first of `columns` its header lacks. Accepts the byte-order
    mark that Excel's "CSV UTF-8" writes first (read as part of the first column's name, it would hide that column)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(f"{path}: no {missing[0]} column (its header: {','.join(header) or 'none'})")
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a UTF-8 CSV ({type(e).__name__})") from None
