"""optim.py: the optimiser and schedule registries, epoch by epoch."""
import math

import pytest
import torch

from optim import OPTIMIZERS, SCHEDULERS, create_optimizer, create_scheduler


def one_param():
    return [torch.nn.Parameter(torch.ones(2))]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers_get_every_setting(name):
    opt = create_optimizer(name, one_param(), lr=0.1, weight_decay=0.01, momentum=0.8)
    group = opt.param_groups[0]
    assert type(opt) is OPTIMIZERS[name]
    assert (group["lr"], group["weight_decay"]) == (0.1, 0.01)
    if name == "SGD":
        assert group["momentum"] == 0.8
    else:
        assert "momentum" not in group  # Adam's betas, untouched by --momentum


def test_unknown_optimizer_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown optimizer 'Lion'; valid: SGD, Adam, AdamW"):
        create_optimizer("Lion", one_param(), lr=0.1)


COSINE = [0.5 * (1 + math.cos(math.pi * d / 4)) for d in range(4)]
EXPECTED_LRS = {  # 4 epochs, lr 1, lr_decay_step 1, milestones [1, 2], gamma 0.5; the LR each epoch trains at
    "none": [1, 1, 1, 1],
    "step": [1, 0.5, 0.25, 0.125],
    "multistep": [1, 0.5, 0.25, 0.25],
    "cosine": COSINE,
    "plateau": [1, 1, 1, 0.5],  # a flat metric: patience 1, then halved
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedules_epoch_by_epoch(name):
    opt = create_optimizer("SGD", one_param(), lr=1.0)
    sched = create_scheduler(name, opt, epochs=4, lr_decay_step=1, milestones=[1, 2], gamma=0.5)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(0.5) if name == "plateau" else sched.step()
    assert lrs == pytest.approx(EXPECTED_LRS[name])


def test_every_schedule_has_its_expectation():
    assert set(EXPECTED_LRS) == set(SCHEDULERS)


def test_warmup_ramps_the_lr_up_then_hands_over_to_the_schedule():
    opt = create_optimizer("SGD", one_param(), lr=0.3)
    sched = create_scheduler("step", opt, epochs=6, lr_decay_step=4, gamma=0.5, warmup_epochs=2)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.15, 0.15])
    with pytest.raises(ValueError, match="--warmup_epochs needs an epoch schedule"):
        create_scheduler("plateau", opt, epochs=6, warmup_epochs=1)
