"""The training loop's parts: train one epoch, evaluate, predict; the device and seeding rules."""
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from model import class_log_probs
from loss import finite_loss


def resolve_device(name):
    """auto|cpu|cuda -> torch.device; asking for CUDA where there is none is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def process_start():
    """Wall-clock start of this process (start-up time is what many short trials pay)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def since_start():
    """Seconds since this process started, as the summary's start-up figures give them."""
    return round(time.time() - process_start(), 2)


def train_one_epoch(model, loader, *, device, augment, normalize, criterion, optimizer, scaler, classification,
                    amp_dtype=None, channels_last=False, clip_grad=0.0, progress=None, log_first_step=False, ema=None, steps_before=0):
    """One pass over the loader; batches are augmented and normalised on the device; ema (timm's ModelEmaV3), when
    given, is updated after every optimiser step with the run's step count (steps_before this epoch, plus this one's),
    as timm's train loop does: its warmup and its first update (a copy) go by that count.
    -> dict(loss, accuracy, images_per_s), and first_step_s (seconds from process start) with log_first_step.
    The loss and accuracy sums stay on the device and are read once, at the end: a read per step would make the
    host wait for the GPU at every step instead of queueing the next one. A diverged loss (NaN or inf) is found
    then, in the sum, and the epoch is never saved (run_epoch checks the weights too)."""
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)  # float64: the same sum as adding loss.item()s
    correct, seen, start, stats = torch.zeros((), dtype=torch.int64, device=device), 0, time.time(), {}
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for step, (x, y) in enumerate(progress(loader) if progress else loader, start=steps_before + 1):
        x = x.to(device, non_blocking=True).float()
        if augment is not None:
            x = augment(x)
        x = normalize(x).contiguous(memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model, step=step)
        total_loss += loss.detach().double() * len(y)
        correct += (class_log_probs(logits.detach(), classification).argmax(1) == y).sum()
        if not seen and log_first_step:  # the one wait of the epoch on purpose: when the first step is really done
            finite_loss(loss)
            stats["first_step_s"] = since_start()
            print(f"first step {stats['first_step_s']:.1f}s after process start", flush=True)
        seen += len(y)
    total_loss = finite_loss(total_loss).item()
    return {"loss": total_loss / max(seen, 1), "accuracy": correct.item() / max(seen, 1), "images_per_s": seen / (time.time() - start),
            **stats}


@torch.no_grad()
def evaluate(model, loader, *, device, normalize, criterion, classification, amp_dtype=None):
    """Validation loss, predictions and class probabilities over a labelled loader (read from the device once)."""
    model.eval()
    total_loss, labels, probs = torch.zeros((), dtype=torch.float64, device=device), [], []
    for x, y in loader:
        y = y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(normalize(x.to(device))).float()
        total_loss += criterion(logits, y).double() * len(y)
        probs.append(class_log_probs(logits, classification).exp())
        labels.append(y)
    probs, labels = torch.cat(probs).cpu().numpy(), torch.cat(labels).cpu().numpy()
    return {"loss": total_loss.item() / max(len(labels), 1), "labels": labels, "preds": probs.argmax(1), "probs": probs}


@torch.no_grad()
def predict(model, loader, *, device, normalize, classification, tta=False, progress=None):
    """Class probabilities for an unlabelled loader; tta averages the horizontally flipped view."""
    model.eval()
    out = []
    for x in (progress(loader) if progress else loader):
        out.append(class_probs(model, normalize(x.to(device)), classification, tta).cpu())
    return torch.cat(out).numpy()


def class_probs(model, x, classification, tta=False):
    """A normalised batch -> (N, C) class probabilities; tta averages the horizontally flipped view. Prediction and
    the ONNX export (training/onnxfile.py) both call this, so the exported graph cannot compute otherwise."""
    p = class_log_probs(model(x), classification).exp()
    if tta:
        p = (p + class_log_probs(model(x.flip(3)), classification).exp()) / 2
    return p
