"""Scores shared by train.py and baseline/evaluation.py: accuracy, macro F1, per-task scores,
the confusion matrix (numpy only: sklearn would add a second to every trial's start-up), a curve still rising.
Its picture is in core/figures.py."""
import numpy as np

from core.labels import TASK_SIZES, TASKS, decode_class


def confusion(labels, preds, num_classes):
    """(num_classes, num_classes) counts, rows = true class, columns = predicted."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def macro_f1(matrix):
    """Mean over all classes of 2TP / (2TP + FP + FN); a class never seen nor predicted counts as 0."""
    tp = np.diag(matrix).astype(float)
    denominator = matrix.sum(0) + matrix.sum(1)
    return float(np.mean(np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)))


def score(labels, preds, num_classes, per_task=False):
    """accuracy and macro F1 over all classes, plus {task}_accuracy / {task}_f1
    (mask, gender, age) for the 18-class mask layout."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    out = {"accuracy": float(np.mean(labels == preds)), "f1": macro_f1(confusion(labels, preds, num_classes))}
    if per_task:
        for task, size, t_true, t_pred in zip(TASKS, TASK_SIZES, decode_class(labels), decode_class(preds)):
            out[f"{task}_accuracy"] = float(np.mean(t_true == t_pred))
            out[f"{task}_f1"] = macro_f1(confusion(t_true, t_pred, size))
    return out


def still_rising(values, window=3, min_rise=0.01):
    """(window, from, to) when the last value is the best and beats the one `window` epochs before by min_rise or more:
    a run that should have trained longer."""
    if len(values) <= window or values[-1] < max(values) or values[-1] - values[-1 - window] < min_rise:
        return None
    return window, values[-1 - window], values[-1]
