import numpy as np
import pytest
import torch

import loss as L

COUNTS = np.arange(1, 19) * 10  # training images per class, as train.py passes them


@pytest.mark.parametrize("classification", ["single", "multi_head"])
@pytest.mark.parametrize("name", list(L.LOSSES))
def test_finite_and_differentiable(name, classification):
    torch.manual_seed(0)
    logits = torch.randn(16, 8 if classification == "multi_head" else 18, requires_grad=True)
    target = torch.randint(0, 18, (16,))
    value = L.create_criterion(name, classification, class_counts=COUNTS)(logits, target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_perfect_predictions_score_low():
    target = torch.arange(18)
    confident = torch.nn.functional.one_hot(target, 18).float() * 20
    for name in L.LOSSES:
        criterion = L.create_criterion(name, class_counts=COUNTS)
        assert criterion(confident, target) < criterion(torch.zeros(18, 18), target)


def test_hyperparameters_reach_the_constructors():
    assert L.create_criterion("focal", focal_gamma=3.5).gamma == 3.5
    assert L.create_criterion("label_smoothing", smoothing=0.25).label_smoothing == 0.25
    heads = L.create_criterion("focal", "multi_head", focal_gamma=0.5)
    assert [m.gamma for m in heads.losses] == [0.5, 0.5, 0.5]


def test_focal_with_gamma_zero_is_cross_entropy():
    torch.manual_seed(1)
    logits, target = torch.randn(8, 18), torch.randint(0, 18, (8,))
    assert torch.allclose(L.create_criterion("focal", focal_gamma=0.0)(logits, target),
                          L.create_criterion("cross_entropy")(logits, target))


def test_multi_head_sums_per_task_losses():
    torch.manual_seed(2)
    logits, target = torch.randn(8, 8), torch.randint(0, 18, (8,))
    ce = torch.nn.functional.cross_entropy
    expected = ce(logits[:, :3], target // 6) + ce(logits[:, 3:5], (target // 3) % 2) + ce(logits[:, 5:], target % 3)
    assert torch.allclose(L.create_criterion("cross_entropy", "multi_head")(logits, target), expected)


def test_unknown_and_nan():
    with pytest.raises(ValueError, match="cross_entropy, weighted_cross_entropy, focal, label_smoothing, f1"):
        L.create_criterion("hinge")
    with pytest.raises(FloatingPointError, match="diverged"):
        L.finite_loss(torch.tensor(float("nan")))


def test_weighted_cross_entropy_weighs_classes_by_inverse_training_count():
    torch.manual_seed(3)
    logits, target = torch.randn(32, 3), torch.randint(0, 3, (32,))
    counts = [80, 15, 5]
    expected = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor([100 / 240, 100 / 45, 100 / 15]))
    assert torch.allclose(L.create_criterion("weighted_cross_entropy", class_counts=counts)(logits, target), expected)
    # a class with no training images still gives a finite loss when it turns up in validation
    absent = L.create_criterion("weighted_cross_entropy", class_counts=[80, 0, 5])(logits[:4], torch.ones(4, dtype=torch.long))
    assert torch.isfinite(absent)
    with pytest.raises(ValueError, match="class_counts"):
        L.create_criterion("weighted_cross_entropy")


def test_weighted_cross_entropy_multi_head_uses_each_tasks_counts():
    counts = np.zeros(18)
    counts[[0, 4, 17]] = [60, 30, 10]  # classes (mask, gender, age) = (0,0,0), (0,1,1), (2,1,2)
    heads = L.create_criterion("weighted_cross_entropy", "multi_head", class_counts=counts).losses
    mask, gender, age = (h.weight.tolist() for h in heads)
    assert mask == pytest.approx([101 / 270, 101 / 3, 101 / 30])  # counts 90, 0 (counted as 1), 10
    assert gender == pytest.approx([100 / 120, 100 / 80])          # counts 60, 40
    assert age == pytest.approx([100 / 180, 100 / 90, 100 / 30])   # counts 60, 30, 10
