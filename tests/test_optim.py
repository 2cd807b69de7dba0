"""optim.py: the optimiser and schedule registries, epoch by epoch."""
import math

import pytest
import torch

from optim import OPTIMIZERS, SCHEDULERS, create_optimizer, create_scheduler, param_groups


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


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_layer_decay_groups_get_the_rates_timms_factory_gives(name):
    """--layer_decay: every parameter's LR and weight decay as timm's factory sets them for the same timm model with
    its own classifier (our head stands where that classifier stands, at scale 1)."""
    import timm
    from timm.optim import create_optimizer_v2
    from model import create_model
    model = create_model(f"timm/{name}", 18)
    groups = param_groups(model, 0.01, 0.05, layer_decay=0.7)
    ours = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    reference = timm.create_model(name, num_classes=18)
    factory = create_optimizer_v2(reference, "adamw", lr=0.01, weight_decay=0.05, layer_decay=0.7)
    theirs = {n: (g["lr"] * g["lr_scale"], g["weight_decay"]) for g in factory.param_groups for n, p in reference.named_parameters()
              if any(p is q for q in g["params"])}
    classifier = reference.pretrained_cfg["classifier"]
    named = dict(model.named_parameters())
    for key, p in named.items():
        theirs_key = key.removeprefix("backbone.") if key.startswith("backbone.") else f"{classifier}.{key.rsplit('.', 1)[1]}"
        assert ours[id(p)] == pytest.approx(theirs[theirs_key]), key
    scales = sorted({round(lr / 0.01, 6) for lr, _ in ours.values()})
    assert scales[-1] == 1.0 and scales[0] < 0.7 ** 3  # the stem moves far less than the head
    assert len({id(p) for g in groups for p in g["params"]}) == len(named)  # every parameter, once


def test_layer_decay_needs_a_timm_backbone():
    from model import create_model
    with pytest.raises(ValueError, match=r"^--layer_decay needs a timm backbone \(--model timm/<name>\): BaseModel has no layer"):
        param_groups(create_model("BaseModel", 18), 0.01, 0.05, layer_decay=0.7)
    groups = param_groups(create_model("BaseModel", 18), 0.01, 0.05)  # off: one group at --lr, as before
    assert len(groups) == 1 and groups[0]["lr"] == 0.01 and groups[0]["weight_decay"] == 0.05
