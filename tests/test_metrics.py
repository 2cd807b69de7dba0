import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from core import metrics


@pytest.mark.parametrize("seed", range(5))
def test_score_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels, preds = rng.integers(0, 18, 200), rng.integers(0, 18, 200)
    preds[:120] = labels[:120]
    out = metrics.score(labels, preds, 18, per_task=True)
    assert np.isclose(out["accuracy"], accuracy_score(labels, preds))
    assert np.isclose(out["f1"], f1_score(labels, preds, labels=np.arange(18), average="macro", zero_division=0))
    assert np.isclose(out["gender_f1"], f1_score((labels // 3) % 2, (preds // 3) % 2, labels=[0, 1], average="macro"))
    assert np.isclose(out["age_accuracy"], np.mean(labels % 3 == preds % 3))


def test_class_never_seen_counts_zero():
    assert metrics.score([0, 0, 1], [0, 0, 1], 3)["f1"] == pytest.approx(2 / 3)


def test_confusion_rows_are_truth():
    m = metrics.confusion([0, 1, 1, 2], [0, 2, 1, 2], 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("classes", [["cat", "dog"], list(range(18)), [f"class_{i}" for i in range(40)]])
def test_confusion_image_fits_its_title_and_shades_by_count(classes):
    n = len(classes)
    matrix = np.zeros((n, n), dtype=np.int64)
    matrix[0, 0], matrix[n - 1, 0] = 9, 1
    title = "a long title: runs/pred/submission.csv macro F1 0.8123"
    image = metrics.confusion_image(matrix, classes, title=title)
    assert image.mode == "RGB" and image.height > 30 * n
    title_band = np.asarray(image)[:18]
    assert (title_band < 128).any() and (title_band[:, :5] == 255).all() and (title_band[:, -5:] == 255).all()
    colours = {tuple(p) for p in np.asarray(image).reshape(-1, 3)}
    assert (8, 48, 107) in colours and (247, 251, 255) in colours  # the peak count darkest blue, empty cells near white
