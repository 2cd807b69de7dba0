"""Scores shared by train.py and baseline/evaluation.py."""
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from dataset import decode_class

TASKS = ("mask", "gender", "age")


def score(labels, preds, num_classes, per_task=False):
    """accuracy and macro F1 (over all classes, so a class never predicted counts as 0),
    plus {task}_accuracy / {task}_f1 for the 18-class mask layout."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    out = {"accuracy": float(accuracy_score(labels, preds)),
           "f1": float(f1_score(labels, preds, labels=np.arange(num_classes), average="macro", zero_division=0))}
    if per_task:
        for task, t_true, t_pred in zip(TASKS, decode_class(labels), decode_class(preds)):
            out[f"{task}_accuracy"] = float(accuracy_score(t_true, t_pred))
            out[f"{task}_f1"] = float(f1_score(t_true, t_pred, average="macro", zero_division=0))
    return out


def confusion(labels, preds, num_classes):
    return confusion_matrix(labels, preds, labels=np.arange(num_classes))


def confusion_figure(matrix, classes, title="confusion matrix"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, n * 0.45 + 2), max(4, n * 0.45 + 1.5)))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90, fontsize=7)
    ax.set_yticklabels(classes, fontsize=7)
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.tight_layout()
    return fig
