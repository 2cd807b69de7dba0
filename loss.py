"""Loss registry. Every loss takes (logits (N, C), target (N,)).

    criterion = create_criterion("focal", classification="multi_head", focal_gamma=2.0)

With classification="multi_head" the 18-class target is decoded into mask,
gender and age targets and the same loss is summed over the three heads.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.labels import decode_class
from model import split_heads


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
    "focal": lambda focal_gamma, **_: FocalLoss(gamma=focal_gamma),
    "label_smoothing": lambda smoothing, **_: nn.CrossEntropyLoss(label_smoothing=smoothing),
    "f1": lambda **_: F1Loss(),
}


class MultiHeadLoss(nn.Module):
    def __init__(self, make_loss):
        super().__init__()
        self.losses = nn.ModuleList(make_loss() for _ in range(3))

    def forward(self, logits, target):
        targets = decode_class(target)
        return sum(loss(head, t) for loss, head, t in zip(self.losses, split_heads(logits), targets))


def create_criterion(name, classification="single", focal_gamma=2.0, smoothing=0.1):
    if name not in LOSSES:
        raise ValueError(f"unknown criterion {name!r}; valid: {', '.join(LOSSES)}")
    make = lambda: LOSSES[name](focal_gamma=focal_gamma, smoothing=smoothing)  # noqa: E731
    return MultiHeadLoss(make) if classification == "multi_head" else make()


def finite_loss(loss):
    """Raise on NaN/inf so that a diverging trial fails with a clear line instead of training on garbage."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}: training diverged (try a lower --lr)")
    return loss
