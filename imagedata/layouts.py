"""The layouts a data dir is read in, and the eval dir:
  mask   DATA/train/images/{id}_{gender}_{race}_{age}/{mask1..5,incorrect_mask,normal}.jpg
         (+ DATA/train/train.csv) and DATA/eval/info.csv + DATA/eval/images/
  folder DATA/<class>/<image>, eval = every image under a folder (nested allowed), or the images a CSV lists
  csv    DATA/train.csv (image,label[,group][,fold]) + the images under DATA; a model of class names, as a folder one
Each reader returns dict(paths, labels, truth, groups, strata, classes); DataError on bad input.
"""
import csv
import os
import sys
from pathlib import Path, PurePosixPath

import numpy as np

from core.files import check_file
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


# The columns a CSV data set's images and labels are found in when no flag names them (case aside), first match wins
IMAGE_COLUMNS = ("image", "image_id", "id", "path", "file", "filename", "image_path")
LABEL_COLUMNS = ("label", "class", "target")


def column(header, given, usual, what, path, flag):
    """The header's column for `what`: the one `flag` names, else the first of the usual names; DataError otherwise."""
    if given:
        if given not in header:
            raise DataError(f"{path}: no {given} column ({flag}; its header: {','.join(header) or 'none'})")
        return given
    lower = {h.strip().lower(): h for h in header}
    found = next((lower[u] for u in usual if u in lower), None)
    if found is None:
        raise DataError(f"{path}: no {what} column among the usual names ({', '.join(usual)}; its header: "
                        f"{','.join(header) or 'none'}): name it with {flag}")
    return found


def find_labels_csv(root, labels_csv):
    """--labels_csv as given (or under the data dir), else the one .csv file at the top of the data dir."""
    if labels_csv:
        for path in (Path(labels_csv), root / labels_csv):
            if path.is_file():
                return path
        raise DataError(f"--labels_csv {labels_csv}: no such file (here or under {root})")
    found = sorted(root.glob("*.csv"))
    if len(found) != 1:
        names = f" ({', '.join(p.name for p in found[:4])})" if found else ""
        raise DataError(f"{root} holds {len(found)} CSV files{names}: name the one with the labels with --labels_csv")
    return found[0]


class ImageIndex:
    """The images under a folder by their path relative to it, with or without the extension, also below images/:
    a CSV's `a1`, `a1.png`, `images/a1.png` and `train/a1.png` are all found."""

    def __init__(self, root):
        self.root, self.by_path, self.by_stem = root, {}, {}
        for file in image_files(root):
            rel = file.relative_to(root).as_posix()
            self.by_path[rel] = str(file)
            self.by_stem.setdefault(rel.rsplit(".", 1)[0], []).append(str(file))

    def find(self, value, where):
        """The file a CSV cell names, or None; DataError for a path out of the folder or an id two images share."""
        rel = PurePosixPath(value.strip().replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise DataError(f"{where}: {value!r} is not a path under {self.root}")
        for key in (rel.as_posix(), f"images/{rel.as_posix()}"):
            if key in self.by_path:
                return self.by_path[key]
            hits = self.by_stem.get(key, [])
            if len(hits) > 1:
                raise DataError(f"{where}: {value!r} names {len(hits)} images ({', '.join(Path(h).name for h in hits[:3])}): "
                                f"give the extension")
            if hits:
                return hits[0]
        return None

    def resolve(self, values, where):
        """CSV cells -> their files; DataError naming the first missing one, with how many more, and a file listed twice."""
        paths, missing, row_of = [], [], {}
        for row, value in enumerate(values, start=2):  # the header is line 1
            path = self.find(value, f"{where} line {row}")
            if path is None:
                missing.append((row, value))
            elif path in row_of:
                raise DataError(f"{where}: {value!r} is listed twice (lines {row_of[path]} and {row}): one image, one row")
            else:
                row_of[path] = row
                paths.append(path)
        if missing:
            more = f" ({len(missing) - 1} more are missing too)" if len(missing) > 1 else ""
            raise DataError(f"{where} line {missing[0][0]}: image {missing[0][1]!r} is not under {self.root}{more}")
        return paths


def read_csv_train(data_dir, age_bounds=None, labels_csv=None, image_column=None, label_column=None, group_column=None,
                   fold_column=None):
    """A CSV of images and labels (the data dir's one .csv, or --labels_csv) and the images under the data dir. Classes
    are the labels, in natural order; a group column keeps each group (a patient, a person, a scene) on one side of
    the split, a fold column gives --kfold's folds."""
    root = check_dir(data_dir, "data dir")
    path = find_labels_csv(root, labels_csv)
    header = csv_header(path)
    image_col = column(header, image_column, IMAGE_COLUMNS, "image", path, "--image_column")
    label_col = column(header, label_column, LABEL_COLUMNS, "label", path, "--label_column")
    needed = [c for c in (image_col, label_col, group_column, fold_column) if c]
    rows = read_csv_rows(path, needed)
    if not rows:
        raise DataError(f"{path}: no rows under its header")
    for col, flag in ((label_col, "label"), (group_column, "--group_column"), (fold_column, "--fold_column")):
        empty = [i for i, row in enumerate(rows, start=2) if col and not (row[col] or "").strip()]
        if empty:
            more = f" ({len(empty) - 1} more rows too)" if len(empty) > 1 else ""
            raise DataError(f"{path} line {empty[0]}: its {col} is empty{more}; every row needs a {flag.lstrip('-')}")
    paths = ImageIndex(root).resolve([row[image_col] or "" for row in rows], str(path))
    names = [row[label_col].strip() for row in rows]
    classes = sorted(set(names), key=natural_key)
    formula = [name for name in classes if formula_like(name)]
    if formula:  # as a class name it becomes submission.csv's answers, which a spreadsheet would run
        raise DataError(f"{path}: label {formula[0]!r} starts as a spreadsheet formula; rename it")
    if len(classes) < 2:
        raise DataError(f"{path}: every row has the label {classes[0]!r}: a classifier needs at least 2 classes")
    check_one_label(paths, root, "rows")
    labels = codes(names, classes)
    data = dict(paths=paths, labels=labels, truth=labels, groups=np.arange(len(paths)), strata=labels, classes=classes)
    if group_column:
        data["groups"] = np.unique([row[group_column].strip() for row in rows], return_inverse=True)[1]
        data["grouped"] = group_column
        check_groups(data, path, group_column)
    if fold_column:
        values = [row[fold_column].strip() for row in rows]
        data["fold_names"] = sorted(set(values), key=natural_key)
        data["folds"] = codes(values, data["fold_names"])
        data["fold_column"] = fold_column
    return data


def codes(values, names):
    """Each value's index in names, as an array."""
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[v] for v in values])


def csv_header(path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a UTF-8 CSV ({type(e).__name__})") from None


def check_groups(data, path, group_column):
    """A grouped split puts whole groups on either side: a class all of whose images are in one group could only be
    on one side, so training or validation would never see it."""
    for index, name in enumerate(data["classes"]):
        groups = np.unique(data["groups"][data["labels"] == index])
        if len(groups) < 2:
            raise DataError(f"{path}: every image of class {name!r} is in one {group_column} group, so no split by "
                            f"{group_column} can put it on both sides; add images of it from other groups, or leave "
                            f"out --group_column")


def read_eval(eval_dir, layout, model="the model"):
    """-> (image_ids, paths). Mask layout keeps info.csv order; folder layout ids are relative paths.
    model: what reads the eval dir, for the line that refuses a dir of the other layout. A model of class names also
    takes a CSV file as the eval dir: the images it lists (under its folder), their ids as written there."""
    if layout != "mask" and Path(eval_dir).suffix.lower() == ".csv":
        check_file("eval CSV", eval_dir)
        return read_eval_csv(Path(eval_dir))
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


def read_eval_csv(path):
    """An eval CSV -> (the ids in its image column as written, their files under its folder)."""
    image_col = column(csv_header(path), None, IMAGE_COLUMNS, "image", path, "one of those names")
    ids = [(row[image_col] or "").strip() for row in read_csv_rows(path, [image_col])]
    if not ids:
        raise DataError(f"eval CSV {path} lists no images")
    return ids, ImageIndex(path.parent).resolve(ids, str(path))


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
