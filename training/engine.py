"""The training loop's parts: train one epoch, evaluate, predict; the device and seeding rules."""
import contextlib
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from core.cli import Resumable, UserError
from loss import finite_loss
from model import class_log_probs


def resolve_device(name):
    """auto|cpu|cuda -> torch.device; asking for CUDA where there is none is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def usable_cores():
    """The cores this process may run on (a container's or taskset's limit), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def trials_here(same_gpu=False):
    """How many of this process's NNI experiment's trials run on this machine now (with same_gpu, on its GPUs: the
    CUDA_VISIBLE_DEVICES NNI gave it), this one included: the processes whose environment names the experiment, by
    trial id. NNI tells a trial nothing of the trials beside it (four share a GPU box under config_gpu.yml), and each
    taking every core slows them all."""
    exp_id, jobs = os.environ["NNI_EXP_ID"].encode(), {os.environ.get("NNI_TRIAL_JOB_ID", "").encode()}  # this one too
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "").encode()
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            pairs = dict(item.split(b"=", 1) for item in env.read_bytes().split(b"\0") if b"=" in item)
        except OSError:  # another user's process, or one that has just ended
            continue
        if (pairs.get(b"NNI_EXP_ID") == exp_id and b"NNI_TRIAL_JOB_ID" in pairs  # not its manager or tuner
                and (not same_gpu or pairs.get(b"CUDA_VISIBLE_DEVICES", b"") == gpus)):
            jobs.add(pairs[b"NNI_TRIAL_JOB_ID"])
    return max(len(jobs), 1)


def cpu_threads(requested=0):
    """Torch's intra-op threads: requested, or (0) OMP_NUM_THREADS where it is set (as torch itself takes it), or
    the usable cores shared among the trials of this process's NNI experiment that run beside it on this machine
    (all of them standalone)."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(usable_cores() // (trials_here() if "NNI_EXP_ID" in os.environ else 1), 1)


@contextlib.contextmanager
def out_of_memory_says(batch_size):
    """torch's OutOfMemoryError while training -> one line (a Resumable) naming the batch size, the trials that share
    the GPU and the settings that make room: four trials of config_gpu.yml share one."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = [f"GPU {gpu}" if gpu else "the GPU"]
        if "NNI_EXP_ID" in os.environ:
            n = trials_here(same_gpu=True)
            where.append(f"{n} trial{'s' if n > 1 else ''} of experiment {os.environ['NNI_EXP_ID']} on it")
            fix = "lower --batch_size, or let fewer trials share a GPU (maxTrialNumberPerGpu in the config)"
        else:
            fix = "lower --batch_size, or end the other processes on that GPU"
        tried = [s for s in str(e).split(". ") if s.startswith("Tried to allocate")]
        raise Resumable(f"out of GPU memory at --batch_size {batch_size} ({', '.join(where + tried)}): {fix}") from None


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
                    amp_dtype=None, channels_last=False, clip_grad=0.0, progress=None, log_first_step=False, ema=None, mix=None,
                    steps_before=0):
    """One pass over the loader; batches are augmented (mixed, with mix) and normalised on the device; ema (timm's ModelEmaV3), when
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
        y = target = y.to(device, non_blocking=True)
        if mix is not None:  # the loss learns the soft targets; accuracy counts the larger share as the label
            x, target = mix(x, y)
            y = target.argmax(1)
        x = normalize(x).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = criterion(logits.float(), target)
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


def model_input(x, device, normalize, channels_last=False):
    """A uint8 or float batch -> normalised floats on the device, in the memory format the model's weights are in
    (a channels-last model fed a contiguous batch pays a layout copy and another kernel choice)."""
    x = normalize(x.to(device, non_blocking=True).float())
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def pad_length(device, length):
    """The length short validation and eval batches are padded to: on a GPU, length (each new batch shape costs
    seconds of kernel selection); on a CPU none: there padding is only more work (docs/gpu.md)."""
    return length if device.type == "cuda" else None


def padded_batches(loader, pad_to=None):
    """The loader's batches, a short one padded with zeros to pad_to (None: none padded) -> (batch, real rows). The
    padding rows are never scored, and in eval mode no row changes another's outputs."""
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = len(x)
        if pad_to and n < pad_to:
            x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
        yield (x, *batch[1:]) if isinstance(batch, (tuple, list)) else x, n


@torch.no_grad()
def evaluate(model, loader, *, device, normalize, criterion, classification, amp_dtype=None, channels_last=False, pad_to=None):
    """Validation loss, predictions and class probabilities over a labelled loader (read from the device once), under
    the training's autocast and memory format, short batches padded to pad_to (padded_batches)."""
    model.eval()
    total_loss, labels, probs = torch.zeros((), dtype=torch.float64, device=device), [], []
    for (x, y), n in padded_batches(loader, pad_to):
        y = y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(model_input(x, device, normalize, channels_last))[:n].float()
        total_loss += criterion(logits, y).double() * len(y)
        probs.append(class_log_probs(logits, classification).exp())
        labels.append(y)
    probs, labels = torch.cat(probs).cpu().numpy(), torch.cat(labels).cpu().numpy()
    return {"loss": total_loss.item() / max(len(labels), 1), "labels": labels, "preds": probs.argmax(1), "probs": probs}


@torch.no_grad()
def predict(model, loader, *, device, normalize, classification, tta=False, progress=None, amp_dtype=None, channels_last=False,
            pad_to=None):
    """Class probabilities for an unlabelled loader; tta averages the horizontally flipped view; amp_dtype and
    channels_last as the model trained (validation's own settings), short batches padded to pad_to (padded_batches)."""
    model.eval()
    out = []
    for x, n in padded_batches(progress(loader) if progress else loader, pad_to):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(class_probs(model, model_input(x, device, normalize, channels_last), classification, tta)[:n].float().cpu())
    return torch.cat(out).numpy()


def class_probs(model, x, classification, tta=False):
    """A normalised batch -> (N, C) class probabilities; tta averages the horizontally flipped view. Prediction and
    the ONNX export (training/onnxfile.py) both call this, so the exported graph cannot compute otherwise."""
    p = class_log_probs(model(x), classification).exp()
    if tta:
        p = (p + class_log_probs(model(x.flip(3)), classification).exp()) / 2
    return p
