"""The checkpoint format (best.pth, last.pth): save, read and check, load a model.

A checkpoint is a dict of plain types and tensors, so that it loads with
torch.load(weights_only=True): a .pth file someone hands you never runs code.
    state_dict, model, classification, head, dropout   rebuild the model
    classes, layout, resize, mean, std                  what its outputs and inputs mean
    metric, args, epoch, best_metric                    how it was trained (args = config.json)
    optimizer, scheduler, history, train_state          last.pth only: what --resume continues from
"""

import torch

from core.runs import replace_atomically
from model import create_model, load_untrusted, num_outputs

REQUIRED = ("state_dict", "model", "classification", "head", "dropout", "classes", "layout", "resize", "mean", "std")
TRAINING_STATE = ("state_dict", "optimizer", "scheduler", "history", "train_state")


def save(path, model, meta, **extra):
    """Written to a temp file and renamed, so a kill never leaves half a file."""
    replace_atomically(path, lambda tmp: torch.save({"state_dict": model.state_dict(), **meta, **extra}, tmp))


def read(path, device="cpu", mmap=False):
    """-> the checkpoint dict; ValueError naming the file if it is missing, unreadable,
    not a train.py checkpoint, or holds anything but plain types and tensors."""
    ckpt = load_untrusted(path, f"checkpoint {path}", device, mmap)
    missing = [k for k in REQUIRED if k not in ckpt] if isinstance(ckpt, dict) else ["state_dict"]
    if missing:
        raise ValueError(f"checkpoint {path}: not a train.py checkpoint (no {', '.join(missing)})")
    return ckpt


def read_meta(path):
    """A checkpoint's description without its weights (memory-mapped, so cheap even for big
    backbones): lets every checkpoint be checked before any prediction starts."""
    return {k: v for k, v in read(path, mmap=True).items() if k not in TRAINING_STATE}


def build_model(ckpt):
    """The checkpoint's model, untrained (its weights are ckpt['state_dict'])."""
    return create_model(ckpt["model"], num_outputs(ckpt["classification"], len(ckpt["classes"])),
                        head=ckpt["head"], dropout=ckpt["dropout"])


def load_model(path, device="cpu"):
    """best.pth/last.pth -> (model in eval mode on device, checkpoint dict)."""
    ckpt = read(path, device)
    model = build_model(ckpt)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: its weights do not fit {ckpt['model']} ({one_line_reason(e)})") from None
    return model.to(device).eval(), ckpt


def one_line_reason(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__
