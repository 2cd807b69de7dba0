"""Out of fold: the K held-out parts of a K-fold split, put together and checked to cover the training images
exactly once, so the score over them is over every image, once. kfold.py (parts predicted from the fold
checkpoints) and finalize.py (parts read from the folds' val_soft.csv) share it."""
from pathlib import Path

import numpy as np

from core.cli import UserError


def join_folds(parts, expected=None, total=None):
    """parts: one (source, fold, ids, labels, probs) per fold, its held-out images; expected: every training image
    id in the order wanted (else sorted ids, and total: how many there must be).
    -> dict(ids, labels (N,), probs (N, C), fold (N,)). UserError naming the source of an image held out twice
    or unknown, or the count of images no fold holds out."""
    if expected is None:
        expected = sorted(i for part in parts for i in part[2])
        if len(set(expected)) == len(expected) and total is not None and len(expected) != total:
            raise UserError(f"{parts[0][0]}: the {len(parts)} held-out parts cover {len(expected)} of the {total} training "
                            f"images (not one K-fold split of the same data?)")
    position = {image: n for n, image in enumerate(expected)}
    fold = np.full(len(expected), -1)
    labels = np.zeros(len(expected), dtype=np.int64)
    probs = np.full((len(expected), parts[0][4].shape[1]), np.nan)
    for source, k, ids, part_labels, part_probs in parts:
        rows = np.array([position.get(i, -1) for i in ids], dtype=np.int64)
        if (rows < 0).any():
            raise UserError(f"{source}: {ids[int(np.argmax(rows < 0))]} is not one of the training images")
        twice = rows[fold[rows] >= 0]
        if len(twice) or len(set(rows.tolist())) < len(rows):
            row = twice[0] if len(twice) else rows[0]
            raise UserError(f"{source}: {expected[row]} is held out {f'in fold{fold[row]} too' if len(twice) else 'twice'} "
                            f"(not one K-fold split?)")
        fold[rows], labels[rows], probs[rows] = k, part_labels, part_probs
    missing = int((fold < 0).sum())
    if missing:
        raise UserError(f"{missing} of the {len(expected)} training images are held out by none of the {len(parts)} "
                        f"folds given (not all K folds?)")
    return dict(ids=list(expected), labels=labels, probs=probs, fold=fold)


def check_held_out(val_soft, ids, labels, fold):
    """A fold's held-out images as rebuilt now from the data dir (ids relative to it, labels) must be those it held out
    when it trained, as its val_soft.csv records them: images added, removed or relabelled since would be scored
    in their place, without a word. UserError naming the fold and what changed."""
    from core.submissions import read_val_soft  # lazy: pandas, only where folds are rebuilt
    if not Path(val_soft).is_file():
        raise UserError(f"{fold}: no {val_soft}, so its held-out images cannot be checked against what it trained on")
    recorded = dict(zip(*read_val_soft(val_soft)[:2]))
    now = dict(zip(ids, (int(label) for label in labels)))
    added, gone = sorted(set(now) - set(recorded)), sorted(set(recorded) - set(now))
    relabelled = sorted(i for i in set(now) & set(recorded) if now[i] != recorded[i])
    if added or gone or relabelled:
        what = "; ".join(f"{len(names)} {how} (e.g. {names[0]})" for how, names in
                         (("added", added), ("gone", gone), ("relabelled", relabelled)) if names)
        raise UserError(f"{fold}: its held-out images differ from the {len(recorded)} it held out when it trained "
                        f"({val_soft}): {what}. The data dir changed since; restore it or train the folds again")
