"""The checkpoint format (best.pth, last.pth), whole: what it holds, saving an epoch, reading and
checking a file, loading its model, what --resume restores and refuses, which last.pth an NNI trial continues,
and what a stopped run's last line says.

A checkpoint is a dict of plain types and tensors, so that it loads with
torch.load(weights_only=True): a .pth file someone hands you never runs code.
    format                                              FORMAT_VERSION (absent in files from before it: 0)
    content_hash                                        {key: sha256 of its value} for every other key, tensors and
                                                        metadata alike, written by save, checked by read whatever
                                                        the format says (format 2 hashed its tensors only; files
                                                        of format 0 and 1 carry none: read with a warning line)
    state_dict, model, classification, head, dropout   rebuild the model
    classes, layout, resize, mean, std                  what its outputs and inputs mean
    metric, args, epoch, best_metric                    how it was trained (args = config.json)
    optimizer, scheduler, history, train_state          last.pth only: what --resume continues from
                                                        (train_state: early-stopping count, every RNG's state)
"""
import contextlib
import hashlib
import math
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.cli import Resumable, UserError, one_line_reason
from core.files import load_untrusted, replace_atomically, replace_together
from core.runs import BEST, EPOCHS, HISTORY, LAST, TENSORBOARD
from model import create_model, num_outputs

FORMAT_VERSION = 3  # 2: content_hash of the tensors; 3: of every key
HASH_KEY = "content_hash"
REQUIRED = ("state_dict", "model", "classification", "head", "dropout", "classes", "layout", "resize", "mean", "std")
TRAINING_STATE = ("state_dict", "optimizer", "scheduler", "history", "train_state", "ema")
# ReduceLROnPlateau's settings (from --lr_gamma, --lr_decay_step): a resume takes them from the flags given now
PLATEAU_SETTINGS = ("factor", "patience", "threshold", "threshold_mode", "cooldown", "min_lrs", "default_min_lr", "eps", "mode",
                    "mode_worse")
UNCHECKED = set()  # files of format 0 or 1 already warned about in this process


def describe(config, data):
    """What every checkpoint of a run says about itself: its flags (config.json) and the data's facts."""
    return dict(format=FORMAT_VERSION, model=config["model"], classification=config["classification"], head=config["head"],
                dropout=config["dropout"], classes=data.classes, layout=data.layout, resize=list(data.resize), mean=data.mean,
                std=data.std, metric=config["metric"], args=config)


def save(path, model, meta, **extra):
    """Written to a temp file and renamed, so a kill never leaves half a file."""
    replace_atomically(path, writer(model, meta, **extra))


def writer(model, meta, **extra):
    """The checkpoint of model, hashed -> a function that writes it to a path."""
    ckpt = {"state_dict": model.state_dict(), **meta, **extra}
    ckpt[HASH_KEY] = content_hash(ckpt)
    return lambda tmp: torch.save(ckpt, tmp)


def content_hash(ckpt):
    """{key: sha256 of its value} for every key but the hash: tensors (place, dtype, shape, bytes) and metadata
    alike, since a reader uses both (class names name the answers, mean/std scale the input). torch.load reads
    tensor data unchecked, so bytes changed on disk, in transfer or by hand would otherwise load and predict
    otherwise without a word; per key, so that a refusal can say what changed."""
    hashes = {}
    for key, value in ckpt.items():
        if key != HASH_KEY:
            digest = hashlib.sha256()
            feed(digest, value)
            hashes[key] = digest.hexdigest()
    return hashes


def feed(digest, value):
    """A value's canonical bytes into digest: type-tagged and length-prefixed, so no two values share bytes."""
    if torch.is_tensor(value):
        digest.update(f"T{value.dtype}{tuple(value.shape)}\0".encode())
        digest.update(value.detach().reshape(-1).view(torch.uint8).cpu().numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}\0".encode())
        for k, v in value.items():
            feed(digest, k)
            feed(digest, v)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}\0".encode())
        for v in value:
            feed(digest, v)
    else:  # str, bytes, numbers, bool, None, torch.Size/dtype: their repr is exact and typed by the tag
        text = repr(value).encode("utf-8", "backslashreplace")
        digest.update(f"{type(value).__name__}{len(text)}\0".encode() + text)


def tensor_hash(ckpt):
    """Format 2's content_hash: sha256 over every tensor only, in the dict's order."""
    digest = hashlib.sha256()
    for where, tensor in tensors({k: v for k, v in ckpt.items() if k != HASH_KEY}):
        digest.update(f"{where} {tensor.dtype} {tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def tensors(value, where=""):
    """(path, tensor) for every tensor in nested dicts, lists and tuples."""
    if torch.is_tensor(value):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from tensors(v, f"{where}/{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from tensors(v, f"{where}/{i}")


def check_hash(path, ckpt):
    """UserError naming the file and what changed, unless its content hash matches. A hash in the file is always
    checked, whatever its format says: the format is an entry like any other, and lowering it must not turn the check
    off. A file without one is read if its format is from before hashes (0, 1: what older releases wrote, but also what
    a hash removed with the format lowered looks like), with one warning line, since nothing in it can be checked;
    format 2 on, the hash was removed."""
    version, saved = ckpt.get("format", 0), ckpt.get(HASH_KEY)
    if saved is None:
        if version < 2:
            if str(path) not in UNCHECKED:  # once: a file is read for its description, then for its model
                UNCHECKED.add(str(path))
                print(f"warning: checkpoint {path}: format {version}, from before checkpoints carried a content hash: "
                      f"read unchecked", file=sys.stderr, flush=True)
            return
        raise UserError(f"checkpoint {path}: format {version} without its content hash (removed?): refused, as a "
                        f"changed file would be")
    if isinstance(saved, str) and version <= 2:  # format 2's: the tensors' hash; a format-3 file of it is refused below
        if saved != tensor_hash(ckpt):
            raise UserError(f"checkpoint {path}: damaged (its tensors do not match the content hash saved with them)")
        return
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {path}: damaged or edited since it was saved (its content hash is not one of format 3)")
    now = content_hash(ckpt)
    changed = sorted(k for k in now.keys() | saved.keys() if now.get(k) != saved.get(k))
    if changed:
        what = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
        raise UserError(f"checkpoint {path}: damaged or edited since it was saved ({what} do not match its content hash)")


def save_epoch(run_dir, model, meta, *, improved, epoch, best, history, optimizer, scheduler, stale, generators, ema=None):
    """best.pth (when the epoch improved) and last.pth, with all that --resume needs. With --ema, best.pth holds the
    averaged weights (the ones validated), last.pth the trained ones and the average beside them."""
    writes = {run_dir / BEST: writer(ema.module if ema is not None else model, meta, epoch=epoch, best_metric=best)} if improved else {}
    writes[run_dir / LAST] = writer(model, meta, epoch=epoch, best_metric=best, history=history, optimizer=optimizer.state_dict(),
                                    scheduler=scheduler.state_dict(), train_state=dict(stale=stale, rng=rng_state(generators)),
                                    **({"ema": ema.module.state_dict()} if ema is not None else {}))
    replace_together(writes)  # both files this epoch's, or both the epoch before's (a disk that fills between them)


def read(path, device="cpu", mmap=False):
    """-> the checkpoint dict; UserError naming the file if it is missing, unreadable, not a train.py
    checkpoint, from a newer format, damaged or edited (any key not hashing as saved), or holds anything but plain
    types and tensors."""
    ckpt = load_untrusted(path, f"checkpoint {path}", device, mmap)
    missing = [k for k in REQUIRED if k not in ckpt] if isinstance(ckpt, dict) else ["state_dict"]
    if missing:
        raise UserError(f"checkpoint {path}: not a train.py checkpoint (no {', '.join(missing)})")
    if ckpt.get("format", 0) > FORMAT_VERSION:
        raise UserError(f"checkpoint {path}: format {ckpt['format']} is newer than this code's {FORMAT_VERSION} "
                        f"(update the code)")
    check_hash(path, ckpt)
    return ckpt


def read_meta(path):
    """A checkpoint's description without its weights (memory-mapped, so cheap even for big
    backbones): lets every checkpoint be checked before any prediction starts."""
    return {k: v for k, v in read(path, mmap=True).items() if k not in TRAINING_STATE}


def continued(own, config, retried=None):
    """The last.pth in NNI trial directory `own` that the trial (flags `config`, config.json's) continues, or None: it
    starts over, and one line says why where there was one. Its own: NNI 3.0 reruns a trial that its crashed manager
    left RUNNING under the same id, in the same directory (`imgcls-nnictl resume`). A retry's (`imgcls-experiment
    --retry-failed`, `retried` its RETRY_OF note {trial, parameter_id}): the retried trial's, from its directory beside
    this one on this machine. A fold's that finalize trains again (RETRY_OF {dirs}: the directories of its earlier fold
    experiments' folds that did not finish): the one trained with these very flags, found on this machine. Copied in;
    either way a trial loses at most the epoch it was in."""
    retried = retried or {}
    if (own / LAST).is_file() or "trial" in retried:
        source = own if (own / LAST).is_file() else own.parent / retried["trial"]
        what = f"{source / LAST}" + (f" (trial {retried['trial']}, which this one retries)" if source != own else "")
        if source != own and config["reshuffle_val"]:
            why = "--reshuffle_val gives every trial its own validation people"
        else:
            why = "not on this machine" if not (source / LAST).is_file() else cannot_continue(source / LAST, config)
    elif retried.get("dirs"):
        dirs = [Path(d).expanduser() for d in retried["dirs"]]
        source = next((d for d in dirs if (d / LAST).is_file() and not cannot_continue(d / LAST, config)), None)
        what = f"{source / LAST} (this fold's, which an earlier fold experiment did not finish)" if source else "an earlier fold"
        why = None if source else f"none of the {len(dirs)} folds that did not finish left a last.pth of these flags here"
    else:
        return None
    if why:
        print(f"not continuing {what}: {why}; starting over", flush=True)
        return None
    if source != own:
        for name in (BEST, LAST, HISTORY, TENSORBOARD, EPOCHS):
            if (source / name).is_dir():
                shutil.copytree(source / name, own / name, dirs_exist_ok=True)
            elif (source / name).is_file():
                shutil.copy2(source / name, own / name)
    print(f"continuing {what}", flush=True)
    return own / LAST


def cannot_continue(path, config):
    """Why last.pth at `path` cannot continue a run whose flags are `config`, or None: it does not read (missing,
    damaged, edited: its hash is checked), or it was trained with other flags. An unset --epochs (the --steps budget,
    made epochs once the data is read) is no difference."""
    try:
        saved = read_meta(path).get("args", {})
    except UserError as e:
        return str(e)
    differ = [k for k in config if k in saved and saved[k] != config[k] and not (k == "epochs" and not config[k])]
    return f"it was trained with --{differ[0]} {saved[differ[0]]}, this run has {config[differ[0]]}" if differ else None


def check_compatible(paths, metas):
    """Soft voting averages column j of every model: refuse unless column j means the same class everywhere."""
    first, ref = paths[0], metas[0]
    for path, meta in zip(paths[1:], metas[1:]):
        if meta["classes"] != ref["classes"]:
            raise UserError(f"checkpoints disagree on classes: {first} has {len(ref['classes'])} "
                            f"({', '.join(map(str, ref['classes'][:4]))}, ...), {path} has {len(meta['classes'])} "
                            f"({', '.join(map(str, meta['classes'][:4]))}, ...); only models of one task can be soft-voted")
        if meta["layout"] != ref["layout"]:
            raise UserError(f"checkpoints disagree on the data layout: {first} is {ref['layout']}, {path} is {meta['layout']}")


def build_model(ckpt):
    """The checkpoint's model, untrained (its weights are ckpt['state_dict'])."""
    return create_model(ckpt["model"], num_outputs(ckpt["classification"], len(ckpt["classes"])),
                        head=ckpt["head"], dropout=ckpt["dropout"], resize=ckpt["resize"])


def load_model(path, device="cpu"):
    """best.pth/last.pth -> (model in eval mode on device, checkpoint dict)."""
    ckpt = read(path, device)
    model = build_model(ckpt)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"checkpoint {path}: its weights do not fit {ckpt['model']} ({one_line_reason(e)})") from None
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- resume
@dataclass
class Progress:
    """Where a run stands: the epoch it starts from (1, or a resumed run's next), the best metric (what best.pth
    holds), its epoch and validation outputs where this process validated them (None: best.pth is an earlier
    process's), the history rows, the epochs since the best (--early_stopping's count), the first step's seconds, and
    whether NNI has the final result."""
    epoch: int = 1
    best: float = -math.inf
    history: list = field(default_factory=list)
    stale: int = 0
    best_epoch: int = None
    best_outputs: dict = None
    first_step_s: float = None
    final_sent: bool = False

    def add(self, row, outputs, metric):
        """An epoch's history row, validation outputs and metric -> whether it is the new best."""
        self.history.append(row)
        if metric > self.best:
            self.best, self.stale, self.best_epoch, self.best_outputs = metric, 0, row["epoch"], outputs
            return True
        self.stale += 1
        return False


def restore(path, *, lr, model, optimizer, scheduler, generators, device, ema=None):
    """last.pth -> model, optimiser, schedule (re-planned for this run's --epochs), random state, the weights'
    moving average with --ema -> Progress. The optimiser and the schedule were built from the flags given now, and their
    settings win over the saved ones (--lr, --weight_decay, --momentum, plateau's --lr_gamma and --lr_decay_step): only
    the state the run accumulated carries on (moments, the plateau's count, the LR's share of --lr each group trains at).
    The best to beat is what best.pth holds, which --average_epochs may have made better than any epoch."""
    state = read(path, device)
    missing = [k for k in ("optimizer", "scheduler", "history", "epoch", "best_metric", *(["ema"] if ema else [])) if k not in state]
    if missing:
        raise UserError(f"--resume {path}: not a last.pth (no {', '.join(missing)}); only last.pth can be resumed")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    planned = {k: v for k, v in scheduler.state_dict().items() if k in PLATEAU_SETTINGS} if plateau else {}
    try:
        model.load_state_dict(state["state_dict"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if plateau:
            scheduler.load_state_dict(dict(state["scheduler"], **planned))
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"--resume {path}: does not fit the run's model and optimiser ({one_line_reason(e)})") from None
    done, was = state["epoch"], (state.get("args") or {}).get("lr", lr)
    for group, now in zip(optimizer.param_groups, settings):  # the plateau's cuts so far, as a share of the LR
        group.update(now, lr=now["lr"] * group["lr"] / (was * group.get("lr_scale", 1.0)) if plateau else now["lr"])
    if plateau:
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    else:
        scheduler.base_lrs, scheduler.last_epoch = [lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups], done
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(done)
    train_state = state.get("train_state") or {}
    if train_state.get("rng"):
        set_rng_state(train_state["rng"], generators)
    best = Path(path).parent / BEST
    return Progress(epoch=done + 1, best=read_meta(best).get("best_metric", -math.inf) if best.is_file() else -math.inf,
                 history=state["history"], stale=train_state.get("stale", 0))


def rng_state(generators):
    """Every random stream training draws from, as plain types (last.pth loads with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=random.getstate(), numpy=[name, keys.tolist(), pos, has_gauss, cached], torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                loaders=[g.get_state() for g in generators])


def set_rng_state(state, generators):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(generators, state["loaders"]):
        generator.set_state(saved)


@contextlib.contextmanager
def interruption_says(run_dir, cut_short=None):
    """A stop signal's last line, or a Resumable's (a full disk, the GPU's memory), says what is true of the run dir
    (resume_hint): the epoch to resume from, or, once training is done, which stage after it was cut short; the
    innermost stage to say it wins."""
    try:
        yield
    except KeyboardInterrupt as e:
        if not getattr(e, "__notes__", None):
            e.add_note(resume_hint(run_dir, cut_short))
        raise
    except Resumable as e:
        if e.resume_said:
            raise
        said = type(e)(f"{e}; {resume_hint(run_dir, cut_short)}")
        said.resume_said = True
        raise said from None


def resume_hint(run_dir, cut_short=None):
    """The truth about what an interrupted run left, read from disk. cut_short: what was stopped after the training
    ended (the eval prediction, ...), which --resume of the finished run then writes."""
    last = Path(run_dir) / LAST
    if not last.is_file():
        return "no epoch finished, so there is nothing to resume"
    if cut_short:
        best = read_meta(Path(run_dir) / BEST)
        return (f"training finished ({last} holds its last epoch, {read_meta(last)['epoch']}; {Path(run_dir) / BEST} its best, "
                f"epoch {best['epoch']}), but {cut_short} was interrupted: write what is missing with --resume {last}")
    return f"{last} holds epoch {read_meta(last)['epoch']}: continue with --resume {last}"
