"""Loss registry. Every loss takes (logits (N, C), target (N,)).

    criterion = create_criterion("focal", classification="multi_head", focal_gamma=2.0)
    criterion = create_criterion("weighted_cross_entropy", class_counts=np.bincount(train_labels))

With classification="multi_head" the 18-class target is decoded into mask,
gender and age targets and the same loss is summed over the three heads
(weighted_cross_entropy weighs each head by its own task's counts).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.cli import UserError
from core.labels import TASK_SIZES, decode_class, split_heads


class FocalLoss(nn.Module):
    def __init__(self, gamma=2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, target):
        log_prob = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
        return (-((1 - log_prob.exp()) ** self.gamma) * log_prob).mean()


class F1Loss(nn.Module):
    """1 - soft macro F1 over the classes."""

    def __init__(self, epsilon=1e-7):
        super().__init__()
        self.epsilon = epsilon

    def forward(self, logits, target):
        prob = F.softmax(logits, dim=-1)
        onehot = F.one_hot(target, logits.shape[-1]).to(prob.dtype)
        tp = (prob * onehot).sum(0)
        precision = tp / (prob.sum(0) + self.epsilon)
        recall = tp / (onehot.sum(0) + self.epsilon)
        f1 = 2 * precision * recall / (precision + recall + self.epsilon)
        return 1 - f1.mean()


# Each entry takes the loss hyperparameters it uses by keyword and ignores the rest.
LOSSES = {
    "cross_entropy": lambda **_: nn.CrossEntropyLoss(),
    "weighted_cross_entropy": lambda class_weights, **_: nn.CrossEntropyLoss(weight=class_weights),
    "focal": lambda focal_gamma, **_: FocalLoss(gamma=focal_gamma),
    "label_smoothing": lambda smoothing, **_: nn.CrossEntropyLoss(label_smoothing=smoothing),
    "f1": lambda **_: F1Loss(),
}

SOFT_TARGETS = ("cross_entropy", "weighted_cross_entropy", "label_smoothing")  # torch's cross entropy takes (N, C) probabilities too


def balanced_weights(counts):
    """Class weights n / (K * count): every class weighs the same in the loss as a whole. An absent
    class counts as one image, so that a batch of it never divides by a zero weight."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1)
    return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)


def task_counts(counts):
    """18-class counts -> the counts of each task's classes (mask, gender, age band)."""
    counts = np.asarray(counts)
    return [np.bincount(task, weights=counts, minlength=size)
            for task, size in zip(decode_class(np.arange(len(counts))), TASK_SIZES)]


class MultiHeadLoss(nn.Module):
    def __init__(self, losses):
        super().__init__()
        self.losses = nn.ModuleList(losses)

    def forward(self, logits, target):
        targets = decode_class(target)
        return sum(loss(head, t) for loss, head, t in zip(self.losses, split_heads(logits), targets))


def create_criterion(name, classification="single", focal_gamma=2.0, smoothing=0.1, class_counts=None):
    """class_counts (training images per class) is needed by weighted_cross_entropy only."""
    if name not in LOSSES:
        raise UserError(f"unknown criterion {name!r}; valid: {', '.join(LOSSES)}")
    if name == "weighted_cross_entropy" and class_counts is None:
        raise UserError("weighted_cross_entropy needs class_counts")
    make = lambda counts: LOSSES[name](focal_gamma=focal_gamma, smoothing=smoothing,  # noqa: E731
                                       class_weights=None if counts is None else balanced_weights(counts))
    if classification == "multi_head":
        return MultiHeadLoss([make(c) for c in (task_counts(class_counts) if class_counts is not None else [None] * len(TASK_SIZES))])
    return make(class_counts)


def finite_loss(loss):
    """Raise on NaN/inf so that a diverging trial fails with a clear line instead of training on garbage."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}: training diverged (try a lower --lr)")
    return loss
