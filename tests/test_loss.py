import pytest
import torch

import loss as L


@pytest.mark.parametrize("classification", ["single", "multi_head"])
@pytest.mark.parametrize("name", list(L.LOSSES))
def test_finite_and_differentiable(name, classification):
    torch.manual_seed(0)
    logits = torch.randn(16, 8 if classification == "multi_head" else 18, requires_grad=True)
    target = torch.randint(0, 18, (16,))
    value = L.create_criterion(name, classification)(logits, target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_perfect_predictions_score_low():
    target = torch.arange(18)
    confident = torch.nn.functional.one_hot(target, 18).float() * 20
    for name in L.LOSSES:
        criterion = L.create_criterion(name)
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
    with pytest.raises(ValueError, match="cross_entropy, focal, label_smoothing, f1"):
        L.create_criterion("hinge")
    with pytest.raises(FloatingPointError, match="diverged"):
        L.finite_loss(torch.tensor(float("nan")))
