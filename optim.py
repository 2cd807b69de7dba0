"""Optimiser and LR-schedule registries.

    optimizer = create_optimizer("AdamW", model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = create_scheduler("cosine", optimizer, epochs=39, warmup_epochs=2)

Every epoch schedule is a closed-form LR factor after `done` finished epochs, so a run resumed with
more --epochs re-plans the rest of its schedule (training/checkpoint.py's restore).
"""
import bisect
import math

import torch

from core.cli import UserError

OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}

# Each entry takes the settings it uses by keyword and ignores the rest. plateau reacts to the metric
# instead (ReduceLROnPlateau, whose state last.pth keeps).
SCHEDULERS = {
    "none": lambda done, **_: 1.0,
    "step": lambda done, step, gamma, **_: gamma ** (done // step),
    "multistep": lambda done, milestones, gamma, **_: gamma ** bisect.bisect_right(sorted(milestones), done),
    "cosine": lambda done, epochs, **_: 0.5 * (1 + math.cos(math.pi * min(done, epochs) / max(1, epochs))),
    "plateau": None,
}


def param_groups(model, lr, weight_decay, layer_decay=0.0):
    """The optimiser's parameter groups: the trainable parameters as one, or with layer_decay (--layer_decay) timm's
    layer-wise groups of a timm backbone (BEiT's rule: each layer's LR scaled by layer_decay per layer above it, 1-D
    parameters without weight decay), our head at scale 1 as timm's own classifier is. Each group's "lr" is lr times
    its "lr_scale", which the epoch schedules scale from."""
    if not layer_decay:
        return [dict(params=[p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, lr_scale=1.0)]
    backbone = getattr(model, "backbone", None)
    if not hasattr(backbone, "group_matcher"):
        raise UserError(f"--layer_decay needs a timm backbone (--model timm/<name>): {type(backbone or model).__name__} "
                        f"has no layer grouping")
    from timm.optim import param_groups_layer_decay  # timm's own grouping, not written again
    groups = [dict(g, lr_scale=g["lr_scale"] * layer_decay)  # one layer below the head, as below timm's classifier
              for g in param_groups_layer_decay(backbone, weight_decay, layer_decay=layer_decay)]
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups += [dict(params=[p for p in head if p.ndim > 1], weight_decay=weight_decay, lr_scale=1.0),
               dict(params=[p for p in head if p.ndim <= 1], weight_decay=0.0, lr_scale=1.0)]
    return [dict(g, lr=lr * g["lr_scale"]) for g in groups if g["params"]]


def create_optimizer(name, params, lr, weight_decay=0.0, momentum=0.9):
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    extra = {"momentum": momentum} if name == "SGD" else {}
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, **extra)


def create_scheduler(name, optimizer, epochs, lr_decay_step=20, milestones=(10, 20, 25), gamma=0.1, warmup_epochs=0):
    """warmup_epochs ramps the LR up linearly (lr / (w + 1), 2 lr / (w + 1), ...) before the schedule's own factor."""
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    if name == "plateau":
        if warmup_epochs:
            raise UserError("--warmup_epochs needs an epoch schedule (step, multistep, cosine, none), not plateau")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max", gamma, patience=lr_decay_step)
    factor = SCHEDULERS[name]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / (warmup_epochs + 1)) * factor(
        done, epochs=epochs, step=lr_decay_step, milestones=list(milestones), gamma=gamma))
