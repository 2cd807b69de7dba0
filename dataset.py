"""Data sources, splits, transforms and the decoded-image cache.

Two layouts are read:
  mask   DATA/train/images/{id}_{gender}_{race}_{age}/{mask1..5,incorrect_mask,normal}.jpg
         (+ DATA/train/train.csv) and DATA/eval/info.csv + DATA/eval/images/
  folder DATA/<class>/<image>, eval = every image under a folder (nested allowed)

Images are decoded, centre-cropped and resized once into a uint8 array
(N, H, W, 3). With the cache on (the default) that array is a memory-mapped
.npy file shared by every trial on the machine; augmentations then work on
uint8 tensors and normalisation happens on the device, in the training loop.
The label scheme lives in core/labels.py, the demo data in core/demo.py.

    python dataset.py --demo data/demo --profiles 300   # write the demo data set
"""
import contextlib
import csv
import fcntl
import hashlib
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from core import demo
from core.cli import make_progress
from core.labels import DEFAULT_AGE_BOUNDS, GENDERS, MASK_FILES, age_band, encode_class, mask_class_names, natural_key

# What a camera, a phone (set to "most compatible") or an export from another tool writes; docs/data.md lists them.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nni-image-classification"


class DataError(Exception):
    """Bad input data: main() prints the message as one line and exits non-zero."""


def warn(line):
    print(f"warning: {line}", file=sys.stderr, flush=True)


def is_image(path):
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def image_files(root):
    """Every image under root at any depth, hidden folders left out. Symlinked folders are followed (a class
    folder made of links to where the photos live), each real folder once, so a link back up cannot loop."""
    seen, found = set(), []
    for folder, dirs, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [f for f in (Path(folder) / name for name in sorted(files)) if is_image(f)]
    return found


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
            paths.append(str(file))
            labels.append(encode_class(MASK_FILES[file.stem], gender, age_band(age, age_bounds)))
            truth.append(encode_class(MASK_FILES[file.stem], gender, age_band(age)))
            groups.append(group)
            strata.append(gender * 3 + age_band(age))
    if not paths:
        raise DataError(f"no images found in {image_root} (expected {{id}}_{{gender}}_{{race}}_{{age}}/mask1.jpg ...)")
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
    folders = sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural_key)
    found = {name: sorted(image_files(root / name), key=lambda f: natural_key(f.name)) for name in folders}
    classes = [name for name in folders if found[name]]
    paths, labels = [], []
    for index, name in enumerate(classes):
        paths += [str(f) for f in found[name]]
        labels += [index] * len(found[name])
    if not paths:
        raise DataError(f"no images found in {root} (expected {root}/<class>/<image>.jpg)")
    if len(classes) < 2:
        raise DataError(f"{root} holds images of {len(classes)} class ({', '.join(classes)}): a classifier needs at least 2 "
                        f"class folders with images")
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


# ----------------------------------------------------------------------------- splits
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


# name -> (layout, reader, splitter)
DATASETS = {
    "MaskSplitByProfileDataset": ("mask", read_mask_train, split_by_profile),
    "MaskBaseDataset": ("mask", read_mask_train, split_random),
    "ImageFolderDataset": ("folder", read_folder_train, split_random),
}


def create_dataset(name, data_dir, age_bounds=DEFAULT_AGE_BOUNDS):
    """-> (layout, data dict, splitter)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    layout, reader, splitter = DATASETS[name]
    return layout, reader(data_dir, age_bounds), splitter


def read_split(name, data_dir, age_bounds, val_ratio, seed, kfold=0, fold=0):
    """The one train/validation split: train.py trains on it, and kfold.py scores each fold's model on
    its held-out part by calling it with the flags the checkpoint saved.
    -> (layout, data dict, train indices, validation indices)."""
    layout, data, splitter = create_dataset(name, data_dir, tuple(age_bounds))
    train_idx, val_idx = splitter(data, val_ratio, seed, kfold, fold)
    for side, indices in (("validation", val_idx), ("training", train_idx)):
        if not len(indices):  # a few people per stratum round to none at a small --val_ratio
            raise DataError(f"the split leaves no {side} images ({len(data['paths'])} images, --val_ratio {val_ratio}"
                            f"{f', --kfold {kfold}' if kfold else ''}): change --val_ratio, or use --kfold K")
    return layout, data, train_idx, val_idx


# ----------------------------------------------------------------------------- decoding + cache
BACKGROUND = (255, 255, 255, 255)  # under transparent pixels, as an image viewer or a web page shows them
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow opens 16-bit greyscale PNG and TIFF as one of these


def to_rgb(img):
    """Any mode Pillow opens -> RGB as a person sees it. convert("RGB") alone clips 16-bit greys (0..65535) to
    white, and drops transparency, showing whatever colour the transparent pixels happen to store."""
    if img.mode in SIXTEEN_BIT:
        grey = np.clip(np.asarray(img, dtype=np.float32) / 257, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.has_transparency_data:  # RGBA, LA, PA, and P or L or RGB with a transparent colour
        return Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND), img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")  # CMYK (Pillow undoes Adobe's inverted CMYK when it reads one), P, L, 1, YCbCr


def decode_image(path, size):
    """The one decoder (training, validation, eval, inference, the cache): file -> uint8 (H, W, 3), turned upright
    by its EXIF orientation (phone photos are stored sideways), every mode to RGB, centre-cropped to the
    target aspect ratio, then resized. Animated GIFs and multi-page TIFFs give their first frame."""
    try:
        with Image.open(path) as img:
            img = to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {e}") from None
    h, w = size
    scale = min(img.width / w, img.height / h)
    cw, ch = round(w * scale), round(h * scale)
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    img = img.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    return np.asarray(img, dtype=np.uint8)


DECODER_VERSION = 2  # in the cache key: a cache decoded otherwise (1: EXIF ignored, 16-bit clipped) is never read


def cache_key(paths, size):
    digest = hashlib.sha1(f"{size[0]}x{size[1]} decoder {DECODER_VERSION}".encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"\0{p}\0{st.st_mtime_ns}\0{st.st_size}".encode())
    return digest.hexdigest()[:20]


def _valid_cache(path, shape):
    """The cache file if it is whole, else None (missing, empty, truncated or of another shape: rebuild it)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    if array.shape != shape or array.dtype != np.uint8:
        return None
    expected = array.offset + array.nbytes
    return array if os.path.getsize(path) == expected else None


def load_images(paths, size, cache_dir=DEFAULT_CACHE_DIR, use_cache=True, progress=None):
    """Decoded images as uint8 (N, H, W, 3): a shared memory-mapped cache file,
    or, with use_cache=False, None (the dataset then decodes on the fly)."""
    if not use_cache:
        return None
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(unwritable_cache(cache_dir, e)) from None
    key = cache_key(paths, size)
    target, shape = cache_dir / f"{key}.npy", (len(paths), size[0], size[1], 3)
    array = _valid_cache(target, shape)
    if array is not None:  # read only: a cache built earlier serves from a read-only dir too
        return array
    try:
        lock = open(cache_dir / f"{key}.lock", "w")
    except OSError as e:
        raise DataError(unwritable_cache(cache_dir, e)) from None
    # Trials that start together: one builds while the others wait on the lock.
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_stale_temps(cache_dir, key)
        array = _valid_cache(target, shape)
        if array is None:
            build_cache(target, paths, size, shape, progress)
            array = _valid_cache(target, shape)
    return array


def unwritable_cache(cache_dir, error):
    return (f"--cache_dir {cache_dir}: cannot write there ({error.strerror or type(error).__name__}); "
            f"pass another --cache_dir, or --no_cache")


def remove_stale_temps(cache_dir, held_key, legacy_age_s=3600):
    """Delete the temp files of builds that died without cleaning up (kill -9, a power cut): each could be as big
    as a whole cache. A build holds its key's lock for as long as its temp file ({key}.*.npy.tmp) exists, so a
    temp file whose lock is free, or is ours (held_key), is stale. Temp files named before keys were (tmp*.npy.tmp)
    have no lock to ask: stale once an hour has passed without a write."""
    for tmp in cache_dir.glob("*.npy.tmp"):
        key = tmp.name.split(".")[0]
        try:
            if key.startswith("tmp"):
                stale = time.time() - tmp.stat().st_mtime > legacy_age_s
            else:
                stale = key == held_key or not is_locked(cache_dir / f"{key}.lock")
            if stale:
                tmp.unlink()
        except FileNotFoundError:  # its build has just renamed it into place
            pass


def is_locked(lock_path):
    """Whether a live process holds this flock ("a", not "w": opening it leaves a live build's lock file as it is)."""
    if not lock_path.exists():
        return False
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True


@contextlib.contextmanager
def signals_raise():
    """SIGTERM and SIGHUP, where nothing else handles them (inference.py, a script), raise SystemExit while a
    cache is built, so that its temp file is removed: by default they end the process without cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def stop(signum, frame):
        raise SystemExit(128 + signum)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for signum, handler in previous.items():
        if handler == signal.SIG_DFL:
            signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def build_cache(target, paths, size, shape, progress=None):
    """Decode every image into a temp .npy next to target, then rename it into place. The file's blocks
    are reserved first: writing a memory map on a full disk would die of SIGBUS, with no message.
    The temp file goes on any exit Python sees; remove_stale_temps takes those of killed builds."""
    with signals_raise():
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{target.stem}.", suffix=".npy.tmp")
        try:
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                os.posix_fallocate(fd, 0, out.offset + out.nbytes)
            except OSError as e:
                raise DataError(f"cannot build the image cache in {target.parent}: {e.strerror} (it needs "
                                f"{np.prod(shape) / 2**20:.1f} MiB; free some space, or pass --cache_dir elsewhere or --no_cache)") from None
            for i, p in enumerate(progress(paths) if progress else paths):
                out[i] = decode_image(p, size)
            out.flush()
            del out
            os.replace(tmp, target)
        finally:
            os.close(fd)
            if os.path.exists(tmp):
                os.remove(tmp)


def decode_all(paths, size, cache_dir=DEFAULT_CACHE_DIR, use_cache=True, desc="decoding images"):
    """Decode every image now, so that an unreadable one stops a run before it starts, not after training:
    into the cache, where the images are then read from, or, without one, once, to check them."""
    if use_cache:
        return load_images(paths, size, cache_dir, True, make_progress(desc))
    progress = make_progress(desc) or (lambda it: it)
    for path in progress(paths):
        decode_image(path, size)
    return None


def mean_std(images, paths, size, limit=2000):
    """Per-channel mean/std in [0, 1] over up to `limit` evenly spaced images, every 4th
    pixel each way: plenty for the statistics, and it keeps trial start-up short."""
    picks = np.linspace(0, len(paths) - 1, min(limit if images is not None else 200, len(paths))).astype(int)
    sample = images[picks] if images is not None else np.stack([decode_image(paths[i], size) for i in picks])
    pixels = sample[:, ::4, ::4].reshape(-1, 3).astype(np.float32) / 255
    return pixels.mean(0, dtype=np.float64).tolist(), np.maximum(pixels.std(0, dtype=np.float64), 1e-3).tolist()


class ImageDataset(Dataset):
    """uint8 CHW tensors (+ label). Reads from the decoded array when there is one, else decodes
    the file. Augmentation happens later, on whole batches on the device (see TRANSFORMS)."""

    def __init__(self, paths, size, images=None, labels=None, indices=None):
        self.paths, self.size, self.images, self.labels = paths, size, images, labels
        self.indices = np.arange(len(paths)) if indices is None else np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        image = self.images[j] if self.images is not None else decode_image(self.paths[j], self.size)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: the cache is read-only
        return (x, int(self.labels[j])) if self.labels is not None else x


# ----------------------------------------------------------------------------- transforms
# Training augmentations run on whole batches on the training device, after the loader:
# the loader then only gathers uint8 images from the cache, and no CPU worker stands
# between the data and a GPU. Each takes and returns a float NCHW batch in [0, 255],
# with its own random draw per image.
class RandomFlip(torch.nn.Module):
    def forward(self, x):
        flip = torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5
        return torch.where(flip, x.flip(3), x)


class RandomAffine(torch.nn.Module):
    """Rotation, shift, zoom (and the horizontal flip, which is one more affine map)
    in a single bilinear resample; edges are filled with edge pixels."""

    def __init__(self, degrees=10.0, translate=0.05, scale=(0.9, 1.1), flip=True):
        super().__init__()
        self.degrees, self.translate, self.scale, self.flip = degrees, translate, scale, flip

    def forward(self, x):
        n, device = len(x), x.device
        angle = torch.empty(n, device=device).uniform_(-self.degrees, self.degrees).deg2rad()
        zoom = torch.empty(n, device=device).uniform_(*self.scale)
        shift = torch.empty(n, 2, device=device).uniform_(-2 * self.translate, 2 * self.translate)
        mirror = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0) if self.flip else torch.ones(n, device=device)
        cos, sin = angle.cos() / zoom, angle.sin() / zoom
        theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                             torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ColorJitter(torch.nn.Module):
    """Brightness, contrast and saturation, each scaled by a factor in [1 - strength, 1 + strength]."""

    def __init__(self, strength=0.3):
        super().__init__()
        self.strength = strength

    def forward(self, x):
        b, c, s = (1 + torch.empty(3, len(x), 1, 1, 1, device=x.device).uniform_(-self.strength, self.strength)).unbind(0)
        x = x * b
        grey_mean = luma(x).mean((2, 3), keepdim=True)
        x = (x - grey_mean) * c + grey_mean
        grey = luma(x)
        return ((x - grey) * s + grey).clamp(0, 255)


def luma(x):
    """Grey (N, 1, H, W) of an RGB batch: plain arithmetic, as a weights tensor would be a copy to the device every step."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


class GaussianNoise(torch.nn.Module):
    def __init__(self, sigma=8.0):
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        return (x + torch.randn_like(x) * self.sigma).clamp(0, 255)


# Every name includes the base transform: centre crop + resize happen at decode time
# (so the cache holds them), normalisation with the data's mean/std on the device.
TRANSFORMS = {
    "base": lambda: [],
    "flip": lambda: [RandomFlip()],
    "flip_affine": lambda: [RandomAffine(flip=True)],
    "color_jitter": lambda: [RandomFlip(), ColorJitter()],
    "gaussian_noise": lambda: [RandomFlip(), GaussianNoise()],
    "strong": lambda: [RandomAffine(flip=True), ColorJitter(), GaussianNoise()],
}


def create_transform(name):
    """-> a module on float NCHW batches in [0, 255], or None for no augmentation."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown augmentation {name!r}; valid: {', '.join(TRANSFORMS)}")
    steps = TRANSFORMS[name]()
    return torch.nn.Sequential(*steps) if steps else None


class Normalize(torch.nn.Module):
    """uint8 or [0, 255] float NCHW batch -> normalised float, on the device."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, x):
        return (x.float() - self.mean) / self.std


# ----------------------------------------------------------------------------- loaders
FEEDS = ("auto", "device", "loader")
NO_CACHE_FOR_DEVICE = "--feed device needs the decoded-image cache: drop --no_cache"
DEVICE_SHARE = 0.5  # of the device's free memory the decoded images may take; the rest is the model's


def loader_workers(requested, cached, device):
    """-1 = choose: from the cache a batch is a ~1 ms gather that workers would only slow down with
    inter-process copies on a CPU; decoding (no cache) and feeding a GPU want workers."""
    if requested >= 0:
        return requested
    return 0 if cached and device.type == "cpu" else min(8, os.cpu_count() or 1)


def choose_feed(requested, image_bytes, device, free_bytes=None):
    """How batches reach the model -> ("device" or "loader", the one line that says why).
    device: the decoded images sit on the training device (copied there once; on a CPU they are the memory-mapped
    cache itself) and each batch is one indexing there: no workers, no collate, no copy per batch. It needs the
    cache (image_bytes None: --no_cache) and, on a GPU, at most DEVICE_SHARE of its free memory (free_bytes).
    loader: the DataLoader, its workers gather or decode, the next batch is copied while this one trains."""
    size = f"{(image_bytes or 0) / 2**20:.0f} MiB" if (image_bytes or 0) < 2**30 else f"{image_bytes / 2**30:.1f} GiB"
    if requested == "device" and image_bytes is None:
        raise ValueError(NO_CACHE_FOR_DEVICE)
    if requested == "loader" or image_bytes is None:
        return "loader", "data feed: loader (" + ("--feed loader)" if requested == "loader" else "no cache: the loader decodes the images)")
    if device.type == "cpu":
        return "device", f"data feed: device (the {size} cache, memory-mapped, indexed in place)"
    room = f"{free_bytes / 2**30:.1f} GiB free on {device}, up to {DEVICE_SHARE:.0%} of it for images, the rest for the model"
    if image_bytes > free_bytes:  # forced or not, the copy itself would fail with CUDA's out-of-memory error
        raise ValueError(f"--feed device: {size} of decoded images do not fit in the {free_bytes / 2**30:.1f} GiB free on {device}; "
                         f"use --feed auto or loader, or a smaller --resize")
    if requested == "device" or image_bytes <= DEVICE_SHARE * free_bytes:
        return "device", f"data feed: device ({size} of decoded images copied to {device} once; {room}" + \
            ("; --feed device)" if image_bytes > DEVICE_SHARE * free_bytes else ")")
    return "loader", f"data feed: loader, not device ({size} of decoded images would not fit: {room}; --feed device forces it)"


def worker_init(worker_id):
    torch.set_num_threads(1)  # workers only slice and augment; the cores belong to the model
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def device_images(images, device):
    """The uint8 (N, H, W, 3) cache as a tensor on the device: on a CPU the memory-mapped file itself (read-only,
    never written: torch's warning about that is silenced), on a GPU one copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        host = torch.from_numpy(images)
    return host if device.type == "cpu" else host.to(device)


class DeviceBatches:
    """A loader whose batches are drawn by indexing images that are already on the device: the epoch's order is
    drawn on the host and sent once, so no step waits for the host. It draws that order from the same batch sampler
    and random streams as a DataLoader with num_workers=0 (one number from its generator, the global one without,
    at each epoch's start), so a fixed seed gives the same batches and the same later random draws either way."""

    def __init__(self, dataset, images, labels, batch_sampler, generator=None):
        self.dataset, self.images, self.labels = dataset, images, labels  # all images (N, H, W, 3) and labels, on the device
        self.batch_sampler, self.generator = batch_sampler, generator
        self.rows = torch.as_tensor(dataset.indices, device=images.device)

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the draw a DataLoader makes for worker seeds
        batches = list(self.batch_sampler)
        order = self.rows[torch.as_tensor([i for b in batches for i in b], device=self.rows.device)]
        start = 0
        for batch in batches:
            rows, start = order[start:start + len(batch)], start + len(batch)
            x = self.images[rows].permute(0, 3, 1, 2).contiguous()  # NCHW, as the loader's collate makes it
            yield x, self.labels[rows]


class Prefetched:
    """A DataLoader's batches on a GPU, each copied on a side stream while the one before trains."""

    def __init__(self, loader, device):
        self.loader, self.dataset, self.device = loader, loader.dataset, device

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        stream, current = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)

        def upload(batch):
            with torch.cuda.stream(stream):
                return None if batch is None else [t.to(self.device, non_blocking=True) for t in batch]

        batches = iter(self.loader)
        following = upload(next(batches, None))
        while following is not None:
            current.wait_stream(stream)
            batch = following
            for t in batch:
                t.record_stream(current)  # the side stream's memory is in use on this one until the step ends
            following = upload(next(batches, None))
            yield tuple(batch)


def make_loaders(train_set, val_set, *, images, labels, sampler, generators, batch_size, valid_batch_size, num_workers, feed,
                 device):
    """The training and validation loaders for the chosen feed -> (train, val, loader workers used)."""
    workers = 0 if feed == "device" else loader_workers(num_workers, images is not None, device)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                     worker_init_fn=worker_init)
    train = DataLoader(train_set, batch_size, shuffle=sampler is None, sampler=sampler,
                       drop_last=len(train_set) > batch_size, generator=generators[0], **loader_kw)
    val = DataLoader(val_set, valid_batch_size, **loader_kw)
    if feed == "device":
        on_device = device_images(images, device), torch.as_tensor(labels, dtype=torch.int64, device=device)
        return DeviceBatches(train_set, *on_device, train.batch_sampler, generators[0]), \
            DeviceBatches(val_set, *on_device, val.batch_sampler), 0
    if device.type == "cuda":
        return Prefetched(train, device), Prefetched(val, device), workers
    return train, val, workers


@dataclass
class TrainingData:
    """What training reads: the split's loaders, and the facts the checkpoint and the run record."""
    layout: str                  # "mask" or "folder"
    classes: list                # class names, index order
    class_counts: np.ndarray     # training images per class (weighted_cross_entropy)
    size: tuple                  # (H, W) after resize
    mean: list                   # per-channel statistics of the training images, in [0, 1]
    std: list
    workers: int                 # loader workers actually used (0 with the device feed)
    feed: str                    # "device" or "loader" (choose_feed)
    feed_note: str               # the line that says which and why
    generators: list             # loader order, weighted draws: their state goes into last.pth
    normalize: torch.nn.Module   # on the device
    augment: torch.nn.Module     # on the device; None for no augmentation
    train_loader: object         # a DataLoader, or DeviceBatches / Prefetched over one
    val_set: "ImageDataset"
    val_loader: object
    val_ids: list                # the validation images' paths relative to the data dir, val_set's order
    val_truth: np.ndarray        # their labels in the data's own scheme: what validation is scored on
    eval_ids: list = None        # with an eval dir: its image ids and paths
    eval_paths: list = None


def load_training_data(*, dataset, data_dir, eval_dir, age_bounds, val_ratio, seed, kfold, fold, resize, augmentation,
                       sampler, batch_size, valid_batch_size, num_workers, cache_dir, use_cache, device, split_seed=None,
                       feed="auto"):
    """Read, split and decode the data (the demo data when no data_dir) -> TrainingData. Every check that
    can fail on the inputs (layout, images, the eval dir and its images) runs here, before a run dir exists.
    split_seed: seeds the train/validation split instead of seed (None: seed). feed: see choose_feed."""
    if data_dir is None and DATASETS[dataset][0] != "mask":
        raise ValueError(f"--dataset {dataset} needs --data_dir (the demo data is in the mask layout)")
    data_dir, eval_dir = demo.data_dirs(data_dir, eval_dir)
    layout, data, train_idx, val_idx = read_split(dataset, data_dir, age_bounds, val_ratio, seed if split_seed is None else split_seed,
                                                  kfold, fold)
    size = tuple(resize)
    eval_ids, eval_paths = read_eval(eval_dir, layout, f"--dataset {dataset}") if eval_dir else (None, None)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    feed, feed_note = choose_feed(feed, None if not use_cache else len(data["paths"]) * size[0] * size[1] * 3, device, free)
    images = load_images(data["paths"], size, cache_dir, use_cache, make_progress("decoding images"))
    if eval_dir:  # predicting them comes after training: an unreadable one must stop the run now, not then
        decode_all(eval_paths, size, cache_dir, use_cache, "decoding eval images")
    mean, std = mean_std(images, data["paths"], size)
    train_set = ImageDataset(data["paths"], size, images, data["labels"], train_idx)
    val_set = ImageDataset(data["paths"], size, images, data["labels"], val_idx)
    generators = [torch.Generator().manual_seed(seed) for _ in range(2)]
    counts = np.bincount(data["labels"][train_idx], minlength=len(data["classes"]))
    draws = None
    if sampler == "weighted":
        draws = WeightedRandomSampler(1.0 / counts[data["labels"][train_idx]], len(train_idx), generator=generators[1])
    train_loader, val_loader, workers = make_loaders(
        train_set, val_set, images=images, labels=data["labels"], sampler=draws, generators=generators, batch_size=batch_size,
        valid_batch_size=valid_batch_size, num_workers=num_workers, feed=feed, device=device)
    return TrainingData(layout=layout, classes=data["classes"], class_counts=counts, size=size, mean=mean, std=std,
                        workers=workers, feed=feed, feed_note=feed_note, generators=generators,
                        normalize=Normalize(mean, std).to(device), augment=create_transform(augmentation),
                        train_loader=train_loader, val_set=val_set, val_loader=val_loader, eval_ids=eval_ids, eval_paths=eval_paths,
                        val_ids=[Path(data["paths"][i]).relative_to(data_dir).as_posix() for i in val_idx],
                        val_truth=data["truth"][val_idx])


if __name__ == "__main__":  # the documented way to write the demo data by hand
    demo.main()
