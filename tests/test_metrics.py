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


@pytest.mark.parametrize("values,warns", [
    ([0.2, 0.4, 0.5, 0.6, 0.7], True),       # best at the end, up 0.3 over the last 3 epochs
    ([0.2, 0.8, 0.80, 0.805, 0.806], False),  # best at the end, but flat: converged
    ([0.2, 0.5, 0.9, 0.7, 0.8], False),       # best earlier: the last epoch is not the best
    ([0.2, 0.5, 0.9], False),                 # too short to tell
])
def test_still_rising_rule(values, warns):
    assert bool(metrics.still_rising(values)) == warns
