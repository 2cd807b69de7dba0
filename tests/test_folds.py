"""core/folds.py: K held-out parts joined into one out-of-fold set that covers the training images once."""
import numpy as np
import pytest

from core.folds import join_folds


def parts_of(*folds):
    """(source, fold, ids, labels, probs) per fold; image i has label i % 3 and a probability row that names it."""
    out = []
    for k, ids in enumerate(folds):
        probs = np.array([[i / 10, 1 - i / 10] for i in range(len(ids))])
        out.append((f"fold{k}/val_soft.csv", k, ids, np.array([int(i[1:]) % 3 for i in ids]), probs))
    return out


def test_parts_are_put_in_the_expected_order():
    parts = parts_of(["i3", "i0"], ["i1", "i2"])
    joined = join_folds(parts, expected=["i0", "i1", "i2", "i3"])
    assert joined["ids"] == ["i0", "i1", "i2", "i3"] and joined["fold"].tolist() == [0, 1, 1, 0]
    assert joined["labels"].tolist() == [0, 1, 2, 0]
    assert joined["probs"][3].tolist() == [0.0, 1.0] and joined["probs"][0].tolist() == [0.1, 0.9]
    assert join_folds(parts, total=4)["ids"] == ["i0", "i1", "i2", "i3"]  # sorted, without a reference order


@pytest.mark.parametrize("folds, kw, message", [
    ((["i0", "i1"], ["i1", "i2"]), dict(expected=["i0", "i1", "i2"]), "fold1/val_soft.csv: i1 is held out in fold0 too"),
    ((["i0", "i0"], ["i1"]), dict(expected=["i0", "i1"]), "fold0/val_soft.csv: i0 is held out twice"),
    ((["i0"], ["i1"]), dict(expected=["i0", "i1", "i2"]), "1 of the 3 training images are held out by none of the 2 folds"),
    ((["i0"], ["i9"]), dict(expected=["i0", "i1"]), "fold1/val_soft.csv: i9 is not one of the training images"),
    ((["i0", "i1"], ["i2"]), dict(total=5), "cover 3 of the 5 training images"),                 # a truncated part
    ((["i0", "i1"], ["i1"]), dict(total=3), "fold1/val_soft.csv: i1 is held out in fold0 too"),
])
def test_parts_that_do_not_cover_the_images_once_are_refused(folds, kw, message):
    with pytest.raises(ValueError, match=message):
        join_folds(parts_of(*folds), **kw)


def test_held_out_images_are_checked_against_what_the_fold_recorded(tmp_path):
    from core.folds import check_held_out
    from core.runs import write_val_soft
    write_val_soft(tmp_path / "val_soft.csv", ["a.jpg", "b.jpg", "c.jpg"], [0, 1, 1], np.full((3, 2), 0.5), ["cat", "dog"])
    check_held_out(tmp_path / "val_soft.csv", ["c.jpg", "a.jpg", "b.jpg"], np.array([1, 0, 1]), "fold 0")  # any order
    for ids, labels, message in [(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], [0, 1, 1, 0], "1 added \\(e.g. d.jpg\\)"),
                                 (["a.jpg", "b.jpg"], [0, 1], "1 gone \\(e.g. c.jpg\\)"),
                                 (["a.jpg", "b.jpg", "c.jpg"], [0, 1, 0], "1 relabelled \\(e.g. c.jpg\\)")]:
        with pytest.raises(ValueError, match=f"fold 0: its held-out images differ from the 3 it held out when it trained "
                                             f"\\({tmp_path / 'val_soft.csv'}\\): {message}. The data dir changed since"):
            check_held_out(tmp_path / "val_soft.csv", ids, np.array(labels), "fold 0")
    with pytest.raises(ValueError, match="fold 1: no .*nowhere.csv, so its held-out images cannot be checked"):
        check_held_out(tmp_path / "nowhere.csv", ["a.jpg"], np.array([0]), "fold 1")
