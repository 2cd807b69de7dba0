"""The demo data: a deterministic painter of people with or without masks, in the mask layout,
and the rule every command follows when no --data_dir is given (the demo data, made on first use).

    python dataset.py --demo data/demo --profiles 300   # write it by hand
"""
import csv
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from core.files import ROOT
from core.labels import MASK_FILES, age_band, encode_class

DEMO_DIR = ROOT / "data" / "demo"

# The competition's training set: about 61% female; 47% under 30, 46% 30-59 and 7% 60 or over, where
# ages stop at 60, so the old band holds only 60-year-olds.
P_FEMALE = 0.61
AGE_BANDS = [(0.47, 18, 29), (0.46, 30, 59), (0.07, 60, 60)]  # (share, first age, last age)

SKIN = [(241, 204, 170), (224, 172, 128), (198, 134, 94), (141, 85, 56)]
HAIR = [(40, 30, 25), (90, 60, 30), (150, 110, 60), (20, 20, 20)]
MASK_COLOURS = [(235, 235, 240), (70, 110, 200), (30, 30, 30), (120, 190, 160)]


def draw_person(rng, mask, gender, age, size=(128, 96)):
    """One photo: gender through hair length and face shape, age through grey hair and forehead
    wrinkles, mask state through the mask's position. The age cues grow smoothly with age, with
    noise, so that ages either side of a band bound look alike, as they do in photos."""
    h, w = size
    bg = tuple(int(c) for c in rng.integers(60, 220, 3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    cx, cy = w / 2 + rng.normal(0, w * 0.04), h * 0.48 + rng.normal(0, h * 0.03)
    fw = w * (0.27 if gender else 0.31) * rng.uniform(0.92, 1.08)
    fh = h * (0.33 if gender else 0.31) * rng.uniform(0.92, 1.08)
    grey = float(np.clip((age - 28) / 34 + rng.normal(0, 0.1), 0, 1))
    hair = tuple(int(c * (1 - grey) + 215 * grey) for c in HAIR[rng.integers(len(HAIR))])
    skin = SKIN[rng.integers(len(SKIN))]
    if gender:  # long hair behind the face down to the shoulders
        d.rounded_rectangle([cx - fw * 1.35, cy - fh * 1.15, cx + fw * 1.35, cy + fh * 1.5], radius=fw * 0.6, fill=hair)
    d.rectangle([cx - fw * 1.2, min(cy + fh * 1.25, h - 2), cx + fw * 1.2, h], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    d.chord([cx - fw * 1.05, cy - fh * 1.12, cx + fw * 1.05, cy + fh * (0.1 if gender else -0.2)], 180, 360, fill=hair)
    eye_y, nose_y, mouth_y = cy - fh * 0.1, cy + fh * 0.25, cy + fh * 0.55
    for ex in (cx - fw * 0.4, cx + fw * 0.4):
        d.ellipse([ex - fw * 0.12, eye_y - fh * 0.06, ex + fw * 0.12, eye_y + fh * 0.06], fill=(30, 30, 30))
    for k in range(int(np.clip(round((age - 24) / 10 + rng.normal(0, 0.5)), 0, 4))):  # forehead wrinkles
        y = cy - fh * (0.5 - 0.09 * k)
        d.arc([cx - fw * 0.5, y - fh * 0.05, cx + fw * 0.5, y + fh * 0.15], 200, 340, fill=(110, 70, 50), width=1)
    d.line([cx, eye_y + fh * 0.1, cx - fw * 0.08, nose_y], fill=(120, 80, 60), width=2)
    d.line([cx - fw * 0.3, mouth_y, cx + fw * 0.3, mouth_y], fill=(150, 50, 50), width=2)
    colour = MASK_COLOURS[rng.integers(len(MASK_COLOURS))]
    if mask == 0:  # worn: covers nose and mouth
        d.rounded_rectangle([cx - fw * 0.85, nose_y - fh * 0.25, cx + fw * 0.85, cy + fh * 0.9], radius=6, fill=colour)
    elif mask == 1:  # worn wrongly: below the nose, on the chin
        d.rounded_rectangle([cx - fw * 0.8, mouth_y + fh * 0.05, cx + fw * 0.8, cy + fh * 1.05], radius=6, fill=colour)
    if mask != 2:
        d.line([cx - fw * 0.85, nose_y, cx - fw * 1.05, eye_y], fill=colour, width=1)
        d.line([cx + fw * 0.85, nose_y, cx + fw * 1.05, eye_y], fill=colour, width=1)
    img = img.rotate(rng.normal(0, 6), resample=Image.BILINEAR, fillcolor=bg)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(3, 12), (h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def quota(rng, shares, n):
    """n labels, label i for round(shares[i] * n) of them (largest remainders), in random order: a small
    set gets the shares exactly instead of drawing them with sampling noise."""
    exact = np.asarray(shares) * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact)[:n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))


def people(rng, n):
    """n (gender, age) pairs with the competition's shares of women and of age bands."""
    genders = quota(rng, [1 - P_FEMALE, P_FEMALE], n)
    bands = quota(rng, [band[0] for band in AGE_BANDS], n)
    return [(int(g), int(rng.integers(AGE_BANDS[b][1], AGE_BANDS[b][2] + 1))) for g, b in zip(genders, bands)]


def make_demo_data(root, profiles=300, eval_profiles=100, size=(128, 96), seed=0):
    """Deterministic mask-layout demo set: root/train (images + train.csv) and
    root/eval (images + info.csv with empty ans) + root/eval/truth.csv. Written
    to a temp dir and renamed, so concurrent trials never see half a data set."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        rows = []
        for pid, (gender, age) in enumerate(people(rng, profiles)):
            name = f"{pid:06d}_{('male', 'female')[gender]}_Asian_{age}"
            folder = tmp / "train" / "images" / name
            folder.mkdir(parents=True)
            for stem, mask in MASK_FILES.items():
                draw_person(rng, mask, gender, age, size).save(folder / f"{stem}.jpg", quality=90)
            rows.append([f"{pid:06d}", ("male", "female")[gender], "Asian", age, name])
        with open(tmp / "train" / "train.csv", "w", newline="") as f:
            csv.writer(f).writerows([["id", "gender", "race", "age", "path"]] + rows)
        (tmp / "eval" / "images").mkdir(parents=True)
        truth = []
        n_eval = eval_profiles * len(MASK_FILES)  # as many images as eval_profiles people have, each of another person
        masks = quota(rng, np.bincount(list(MASK_FILES.values())) / len(MASK_FILES), n_eval)
        for k, ((gender, age), mask) in enumerate(zip(people(rng, n_eval), masks)):
            image_id = f"{hashlib.sha1(f'{seed}-{k}'.encode()).hexdigest()[:16]}.jpg"
            draw_person(rng, mask, gender, age, size).save(tmp / "eval" / "images" / image_id, quality=90)
            truth.append((image_id, encode_class(mask, gender, age_band(age))))
        with open(tmp / "eval" / "info.csv", "w", newline="") as f:
            csv.writer(f).writerows([["ImageID", "ans"]] + [[i, 0] for i, _ in truth])
        with open(tmp / "eval" / "truth.csv", "w", newline="") as f:
            csv.writer(f).writerows([["ImageID", "ans"]] + truth)
        try:
            os.rename(tmp, root)
        except OSError:  # another process won the race: its copy is identical
            if not (root / "train").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def make_digits_csv(root, per_class=60, eval_per_class=10, writers=30, size=32, seed=0):
    """scikit-learn's handwritten digits (8x8, offline) as a Kaggle-style CSV data set, drawn unlike the demo:
    root/train/train.csv (image_id without extension, label as a word, writer, fold) + root/train/images/<id>.png,
    root/eval/test.csv (image_id) + root/eval/images/ + root/eval/truth.csv. Each writer has a pen of their own (a
    tint), so a split that lets a writer straddle it flatters validation, as people do in the mask data."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    pens = rng.uniform(0.55, 1.0, (writers, 3))
    picked = [rng.permutation(np.flatnonzero(digits.target == d))[:per_class + eval_per_class] for d in range(10)]
    rows, truth = [], []
    for d, indices in enumerate(picked):
        for k, i in enumerate(indices):
            writer = int(rng.integers(writers))
            grey = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR)
            image = Image.fromarray((np.asarray(grey)[..., None] * pens[writer]).astype(np.uint8))
            image_id = f"{d}{k:03d}{hashlib.sha1(f'{seed}-{i}'.encode()).hexdigest()[:6]}"
            side = "train" if k < per_class else "eval"
            (root / side / "images").mkdir(parents=True, exist_ok=True)
            image.save(root / side / "images" / f"{image_id}.png")
            if side == "train":
                rows.append([image_id, DIGITS[d], f"w{writer:02d}", writer % 5])
            else:
                truth.append([image_id, DIGITS[d]])
    for path, header, table in ((root / "train" / "train.csv", ["image_id", "label", "writer", "fold"], rows),
                                (root / "eval" / "test.csv", ["image_id"], [t[:1] for t in truth]),
                                (root / "eval" / "truth.csv", ["ImageID", "ans"], truth)):  # as imgcls-evaluation reads it
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([header] + sorted(table))
    return root


def ensure_demo_data(root=DEMO_DIR, **kwargs):
    root = Path(root)
    if not (root / "train").is_dir():
        print(f"making demo data in {root} (first use)", flush=True)
        root.parent.mkdir(parents=True, exist_ok=True)
        make_demo_data(root, **kwargs)
    return root


def data_dirs(data_dir, eval_dir, make=True):
    """No data_dir means the demo data (made on first use when make), and then, unless eval_dir
    is given, its eval split -> (train dir, eval dir or None)."""
    if data_dir is not None:
        return Path(data_dir), eval_dir
    root = ensure_demo_data() if make else DEMO_DIR
    return root / "train", eval_dir or root / "eval"


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Write the deterministic demo data set (mask layout).")
    parser.add_argument("--demo", type=Path, default=DEMO_DIR, help=f"output dir (default: {DEMO_DIR})")
    parser.add_argument("--profiles", type=int, default=300, help="people in train (default: 300)")
    parser.add_argument("--eval_profiles", type=int, default=100, help="eval images / 7 (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--digits", action="store_true",
                        help="write scikit-learn's handwritten digits as a CSV data set instead (train/train.csv with "
                             "image_id,label,writer,fold, eval/test.csv): --dataset CsvDataset")
    cli = parser.parse_args(argv)
    if cli.demo.exists():
        parser.error(f"{cli.demo} exists; remove it first")
    cli.demo.parent.mkdir(parents=True, exist_ok=True)
    if cli.digits:
        make_digits_csv(cli.demo, seed=cli.seed)
    else:
        make_demo_data(cli.demo, cli.profiles, cli.eval_profiles, seed=cli.seed)
    print(f"wrote {cli.demo}")
