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

from core.labels import MASK_FILES, age_band, encode_class

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"

SKIN = [(241, 204, 170), (224, 172, 128), (198, 134, 94), (141, 85, 56)]
HAIR = [(40, 30, 25), (90, 60, 30), (150, 110, 60), (20, 20, 20)]
MASK_COLOURS = [(235, 235, 240), (70, 110, 200), (30, 30, 30), (120, 190, 160)]


def draw_person(rng, mask, gender, age, size=(128, 96)):
    """One photo: gender through hair length and face shape, age through hair
    colour, wrinkles and skin tone, mask state through the mask's position."""
    h, w = size
    bg = tuple(int(c) for c in rng.integers(60, 220, 3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    cx, cy = w / 2 + rng.normal(0, w * 0.04), h * 0.48 + rng.normal(0, h * 0.03)
    fw = w * (0.27 if gender else 0.31) * rng.uniform(0.92, 1.08)
    fh = h * (0.33 if gender else 0.31) * rng.uniform(0.92, 1.08)
    grey = min(1.0, max(0.0, (age - 40) / 30)) * rng.uniform(0.7, 1.0)
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
    if age >= 30:  # forehead wrinkles, more with age
        for k in range(1 + (age >= 45) + (age >= 60)):
            y = cy - fh * (0.45 - 0.1 * k)
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


def _random_person(rng):
    return int(rng.integers(2)), int(rng.choice([rng.integers(18, 30), rng.integers(30, 60), rng.integers(60, 80)]))


def make_demo_data(root, profiles=300, eval_profiles=60, size=(128, 96), seed=0):
    """Deterministic mask-layout demo set: root/train (images + train.csv) and
    root/eval (images + info.csv with empty ans) + root/eval/truth.csv. Written
    to a temp dir and renamed, so concurrent trials never see half a data set."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        rows = []
        for pid in range(profiles):
            gender, age = _random_person(rng)
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
        for k in range(eval_profiles * len(MASK_FILES)):
            gender, age = _random_person(rng)
            mask = int(rng.choice([0, 0, 0, 0, 0, 1, 2]))
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
    parser.add_argument("--eval_profiles", type=int, default=60, help="eval images / 7 (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    cli = parser.parse_args(argv)
    if cli.demo.exists():
        parser.error(f"{cli.demo} exists; remove it first")
    cli.demo.parent.mkdir(parents=True, exist_ok=True)
    make_demo_data(cli.demo, cli.profiles, cli.eval_profiles, seed=cli.seed)
    print(f"wrote {cli.demo}")
