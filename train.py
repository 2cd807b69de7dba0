"""Train one image classifier; under NNI, one trial of a search.

    python train.py                                    # demo data (made on first use) -> runs/exp
    python train.py --model efficientnet_b0 --pretrained --weights effnet_b0.pth --resize 224 224
    python train.py --data_dir /data/train --eval_dir /data/eval --criterion focal --focal_gamma 2
    python train.py --dataset ImageFolderDataset --data_dir flowers/train --eval_dir flowers/test
    python train.py --kfold 5 --fold 0 --name fold0
    python train.py --config runs/exp/config.json --epochs 20
    python train.py --resume runs/exp/last.pth         # continue a killed run in runs/exp
    nnictl create --config config_local.yml            # TPE search; train.py reports to NNI

Under NNI, nni.get_next_parameter() is merged over the flags (keys = flag dest
names; Hyperband's and BOHB's TRIAL_BUDGET sets --epochs) and the run directory is $NNI_OUTPUT_DIR.
"""
import argparse
import bisect
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

import dataset
from core import checkpoint, demo
from core.cli import Parser, make_progress, run_main, trial_budget
from core.engine import evaluate, loader_workers, predict, resolve_device, seed_everything, train_one_epoch, worker_init
from core.metrics import confusion, confusion_image, score
from core.runs import increment_path, write_config, write_history, write_submission
from dataset import DATASETS, TRANSFORMS, DataError, ImageDataset, Normalize
from loss import LOSSES, create_criterion
from model import CLASSIFICATIONS, INITS, MODELS, WeightsError, create_model, num_outputs

UNDER_NNI = "NNI_PLATFORM" in os.environ  # set by NNI's trial keeper: parameters come from, and metrics go to, the tuner

OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}

# LR factor after `done` finished epochs, in closed form: a run resumed with more --epochs re-plans the
# rest of its schedule. Each entry takes the settings it uses by keyword and ignores the rest.
# plateau reacts to the metric instead (ReduceLROnPlateau, whose state last.pth keeps).
SCHEDULERS = {
    "none": lambda done, **_: 1.0,
    "step": lambda done, step, gamma, **_: gamma ** (done // step),
    "multistep": lambda done, milestones, gamma, **_: gamma ** bisect.bisect_right(sorted(milestones), done),
    "cosine": lambda done, epochs, **_: 0.5 * (1 + math.cos(math.pi * min(done, epochs) / max(1, epochs))),
    "plateau": None,
}
# What a resumed run cannot change: the data split, the model's shape, the optimiser's state and the metric.
FIXED_ON_RESUME = ("dataset", "data_dir", "age_bounds", "val_ratio", "kfold", "fold", "seed", "resize", "model",
                   "classification", "head", "freeze_backbone", "optimizer", "scheduler", "metric")


def create_optimizer(name, params, lr, weight_decay=0.0, momentum=0.9):
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    extra = {"momentum": momentum} if name == "SGD" else {}
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, **extra)


def create_scheduler(name, optimizer, epochs, lr_decay_step=20, milestones=(10, 20, 25), gamma=0.1, warmup_epochs=0):
    """warmup_epochs ramps the LR up linearly (lr / (w + 1), 2 lr / (w + 1), ...) before the schedule's own factor."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    if name == "plateau":
        if warmup_epochs:
            raise ValueError("--warmup_epochs needs an epoch schedule (step, multistep, cosine, none), not plateau")
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max", gamma, patience=lr_decay_step)
    factor = SCHEDULERS[name]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / (warmup_epochs + 1)) * factor(
        done, epochs=epochs, step=lr_decay_step, milestones=list(milestones), gamma=gamma))


# ----------------------------------------------------------------------------- arguments
def build_parser():
    p = Parser(prog="train.py", description="Train an image classifier (standalone or as an NNI trial).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default=None, help="training data (mask layout: DATA/train; folder layout: DATA/<class>/); "
                   "unset = demo data in data/demo, made on first use")
    g.add_argument("--eval_dir", default=None, help="eval data to predict after training (unset with demo data = the demo eval split)")
    g.add_argument("--dataset", default="MaskSplitByProfileDataset", choices=list(DATASETS), help="layout and split")
    g.add_argument("--age_bounds", nargs=2, type=int, default=[30, 60], metavar=("LOW", "HIGH"), help="age band bounds (mask layout)")
    g.add_argument("--val_ratio", type=float, default=0.2, help="validation share")
    g.add_argument("--kfold", type=int, default=0, help="K for stratified group k-fold (0 = off: use --val_ratio)")
    g.add_argument("--fold", type=int, default=0, help="which fold is validation, 0..K-1")
    g.add_argument("--resize", nargs=2, type=int, default=[128, 96], metavar=("H", "W"), help="input size after centre crop")
    g.add_argument("--augmentation", default="flip_affine", choices=list(TRANSFORMS), help="training augmentation")
    g.add_argument("--sampler", default="none", choices=["none", "weighted"], help="weighted = inverse class frequency")
    g.add_argument("--num_workers", type=int, default=-1, help="loader workers (-1 = from the CPU count)")
    g.add_argument("--cache_dir", default=str(dataset.DEFAULT_CACHE_DIR), help="decoded-image cache shared by trials")
    g.add_argument("--no_cache", action="store_true", help="decode images every epoch instead of caching them")
    g.add_argument("--cache", dest="no_cache", action="store_false", help="use the cache (undoes no_cache from --config)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="BaseModel", choices=list(MODELS), help="backbone")
    g.add_argument("--classification", default="single", choices=CLASSIFICATIONS,
                   help="single 18-way head, or multi_head = mask/gender/age heads (mask layout)")
    g.add_argument("--head", default="none", help="hidden layers of the head, e.g. 512-256 (BN, ReLU, dropout each)")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout in the head")
    g.add_argument("--init", default="default", choices=INITS, help="weight init of new layers")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False, help="start from ImageNet weights (downloads unless --weights)")
    g.add_argument("--weights", default=None, help="offline ImageNet weights file for the backbone")
    g.add_argument("--freeze_backbone", action=argparse.BooleanOptionalAction, default=False, help="train the head only")

    add_optimisation_flags(p)

    g = p.add_argument_group("run")
    g.add_argument("--name", default="exp", help="run name: runs/<name>, incremented (exp2, exp3, ...)")
    g.add_argument("--model_dir", default="runs", help="where runs go")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when available")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="mixed precision on CUDA (bf16 where supported, else fp16)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels-last memory format: faster convolutions on CUDA, and BaseModel trained 18%% faster with it on a 2-core CPU")
    g.add_argument("--cudnn_benchmark", action=argparse.BooleanOptionalAction, default=False,
                   help="autotune every convolution shape on CUDA: about 10%% faster steps, but efficientnet_b0 at 224 "
                        "on an H200 waited 40 s for its first step instead of 8; pays in runs of hundreds of epochs")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--config", default=None, help="JSON/YAML file of flag values (keys = dest names); flags override it")
    g.add_argument("--resume", default=None, help="last.pth of a run to continue in its directory")
    g.add_argument("--print_flags", action="store_true",
                   help="print every flag's value (after --config, --resume and NNI's parameters) as JSON and exit, "
                        "reading and writing nothing else (SafeTPE's start_from_defaults reads the defaults this way)")
    return p


def add_optimisation_flags(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=0, help="epochs (0 = as many as --steps takes on this data)")
    g.add_argument("--steps", type=int, default=1000,
                   help="training length in optimiser steps when --epochs is 0: a small data set gets more epochs, a large one fewer")
    g.add_argument("--batch_size", type=int, default=64, help="training batch size")
    g.add_argument("--valid_batch_size", type=int, default=256, help="validation/eval batch size")
    g.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    g.add_argument("--optimizer", default="AdamW", choices=list(OPTIMIZERS), help="optimizer")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--scheduler", default="cosine", choices=list(SCHEDULERS), help="LR schedule")
    g.add_argument("--lr_decay_step", type=int, default=20, help="step: epochs per decay; plateau: patience")
    g.add_argument("--milestones", nargs="+", type=int, default=[10, 20, 25], help="multistep: epochs where LR is multiplied by --lr_gamma")
    g.add_argument("--lr_gamma", type=float, default=0.1, help="LR decay factor (step, multistep, plateau)")
    g.add_argument("--warmup_epochs", type=int, default=0, help="linear LR warmup over the first N epochs")
    g.add_argument("--clip_grad", type=float, default=0.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--criterion", default="cross_entropy", choices=list(LOSSES),
                   help="loss (weighted_cross_entropy: class weights from the training counts)")
    g.add_argument("--focal_gamma", type=float, default=2.0, help="focal loss gamma")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--metric", default="accuracy", choices=["accuracy", "f1"], help="picks the best checkpoint; NNI's 'default'")
    g.add_argument("--early_stopping", type=int, default=0, help="stop after N epochs without improvement (0 = off)")


def coerce(action, value):
    """A value from a config file or NNI -> the type its flag would give, or ValueError."""
    key = action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"parameter {key!r} must be true/false, got {value!r}")
        return value
    if action.nargs is not None:
        if not isinstance(value, (list, tuple)) or (action.nargs == 2 and len(value) != 2):
            raise ValueError(f"parameter {key!r} must be a list of {action.nargs} values, got {value!r}")
        return [coerce_one(action, key, v) for v in value]
    return coerce_one(action, key, value)


def coerce_one(action, key, value):
    kind = action.type or str
    if value is None and action.default is None:
        return None
    if kind is int and isinstance(value, float) and value.is_integer():  # TPE's quniform yields 32.0
        value = int(value)
    ok = isinstance(value, str) if kind is str else (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or (kind is int and not isinstance(value, int)):
        raise ValueError(f"parameter {key!r} must be {kind.__name__}, got {value!r}")
    value = kind(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"parameter {key!r}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def apply_params(parser, args, params, source):
    """Merge a {dest: value} dict (config file or NNI; nested {"_name": ...} choices
    flattened) into args. Unknown keys and wrong types stop the run."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "resume")}
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            value = dict(value)
            if "_name" not in value:
                raise ValueError(f"{source}: parameter {key!r} is a dict without '_name'")
            flat[key] = value.pop("_name")
            flat.update(value)
        else:
            flat[key] = value
    for key, value in flat.items():
        if key not in actions:
            raise ValueError(f"{source}: unknown parameter {key!r}; valid: {', '.join(actions)}")
        try:
            setattr(args, key, coerce(actions[key], value))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    return args


def read_config(path):
    check_file("--config", path)
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix in (".yml", ".yaml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError: the file, not our code
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"--config {path}: not valid {'YAML' if path.suffix in ('.yml', '.yaml') else 'JSON'} ({reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    return data


def parse_args(argv=None):
    """Flags given on the command line over (--config file or the resumed run's config) over defaults;
    then NNI's parameters on top."""
    parser = build_parser()
    args = parser.parse_args(argv)
    base = vars(parser.parse_args([]))
    explicit = given_flags(argv)
    if args.resume:
        check_file("--resume", args.resume)
        saved = checkpoint.read_meta(args.resume).get("args", {})
        args = apply_params(parser, argparse.Namespace(**base), saved, f"--resume {args.resume}")
        check_resume(args, explicit)
    elif args.config:
        args = apply_params(parser, argparse.Namespace(**base), read_config(args.config), f"--config {args.config}")
    vars(args).update(explicit)
    if UNDER_NNI:
        import nni
        apply_params(parser, args, trial_budget(nni.get_next_parameter() or {}), "NNI parameters")
    check_args(args)
    return args


def given_flags(argv):
    """{dest: value} of the flags on the command line, also those equal to their default."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def check_resume(saved, explicit):
    """A resumed run continues the same training: refuse flags that would change what last.pth means."""
    changed = [k for k in FIXED_ON_RESUME if k in explicit and explicit[k] != getattr(saved, k)]
    if changed:
        k = changed[0]
        raise ValueError(f"--resume: --{k} {explicit[k]} differs from the run's {getattr(saved, k)}; resuming cannot change "
                         f"{', '.join(FIXED_ON_RESUME)} (start a new run with --config on its config.json instead)")


# What each number must be; NaN fails every test. Values outside these ranges would train on silently.
POSITIVE, NON_NEGATIVE, FRACTION = (lambda v: 0 < v < math.inf, "positive"), (lambda v: v >= 0, "0 or more"), (lambda v: 0 <= v < 1, "in [0, 1)")
LIMITS = {"steps": POSITIVE, "batch_size": POSITIVE, "valid_batch_size": POSITIVE, "lr": POSITIVE, "lr_gamma": POSITIVE,
          "epochs": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE, "clip_grad": NON_NEGATIVE, "early_stopping": NON_NEGATIVE,
          "weight_decay": NON_NEGATIVE, "momentum": NON_NEGATIVE, "focal_gamma": NON_NEGATIVE, "lr_decay_step": POSITIVE,
          "dropout": FRACTION, "smoothing": FRACTION, "num_workers": (lambda v: v >= -1, "-1 (from the CPU count) or more")}


def check_file(flag, path):
    if not Path(path).is_file():
        raise ValueError(f"{flag} {path}: {'not a file' if Path(path).exists() else 'no such file'}")


def check_args(args):
    for key, (ok, must) in LIMITS.items():
        if not ok(getattr(args, key)):
            raise ValueError(f"--{key} {getattr(args, key)}: must be {must}")
    if min(args.resize) <= 0:
        raise ValueError(f"--resize {args.resize[0]} {args.resize[1]}: sizes must be positive")
    if not 0 < args.val_ratio < 1:
        raise ValueError(f"--val_ratio {args.val_ratio}: must be between 0 and 1")
    if not 0 < args.age_bounds[0] < args.age_bounds[1]:
        raise ValueError(f"--age_bounds {args.age_bounds[0]} {args.age_bounds[1]}: need 0 < LOW < HIGH")
    if min(args.milestones) < 1:
        raise ValueError(f"--milestones {' '.join(map(str, args.milestones))}: epochs count from 1")
    if args.kfold and not (args.kfold >= 2 and 0 <= args.fold < args.kfold):
        raise ValueError(f"--kfold {args.kfold} --fold {args.fold}: need K >= 2 and 0 <= fold < K")
    if args.weights:
        check_file("--weights", args.weights)
    if args.classification == "multi_head" and DATASETS[args.dataset][0] != "mask":
        raise ValueError(f"--classification multi_head needs a mask-layout dataset, not {args.dataset}")


# ----------------------------------------------------------------------------- main
def main(args):
    """Data, model, run directory, fit, predict. Inputs are read and checked before anything is written."""
    if args.print_flags:
        print(json.dumps(run_config(args)))
        return None, None
    device = resolve_device(args.device)
    seed_everything(args.seed)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    data = load_data(args, device)
    if not args.epochs:  # the step budget, in whole epochs; config.json then records the epochs it became
        args.epochs = math.ceil(args.steps / len(data.train_loader))
        print(f"training {args.epochs} epochs: --steps {args.steps} at {len(data.train_loader)} steps per epoch", flush=True)
    model = create_model(args.model, num_outputs(args.classification, len(data.classes)), head=args.head, dropout=args.dropout,
                         init=args.init, pretrained=args.pretrained, weights=args.weights, freeze_backbone=args.freeze_backbone)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    opt = build_optimisation(args, data, model, device)
    run_dir, start = open_run_dir(args, data, model, opt, device)
    try:
        best = fit(args, data, model, opt, run_dir, start, device)
    except KeyboardInterrupt as e:
        e.add_note(resume_hint(run_dir))
        raise
    if data.eval_ids is not None:
        predict_eval(args, data, model, run_dir, device)
    return best, run_dir


def load_data(args, device):
    """Read, split and decode the data (the demo data when no --data_dir) -> a namespace of loaders and facts."""
    if args.data_dir is None and DATASETS[args.dataset][0] != "mask":
        raise ValueError(f"--dataset {args.dataset} needs --data_dir (the demo data is in the mask layout)")
    data_dir, eval_dir = demo.data_dirs(args.data_dir, args.eval_dir)
    layout, data, splitter = dataset.create_dataset(args.dataset, data_dir, tuple(args.age_bounds))
    size = tuple(args.resize)
    train_idx, val_idx = splitter(data, args.val_ratio, args.seed, args.kfold, args.fold)
    eval_ids, eval_paths = dataset.read_eval(eval_dir, layout) if eval_dir else (None, None)
    images = dataset.load_images(data["paths"], size, args.cache_dir, not args.no_cache, make_progress("decoding images"))
    mean, std = dataset.mean_std(images, data["paths"], size)
    workers = loader_workers(args.num_workers, images is not None, device)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                     worker_init_fn=worker_init)
    train_set = ImageDataset(data["paths"], size, images, data["labels"], train_idx)
    val_set = ImageDataset(data["paths"], size, images, data["labels"], val_idx)
    generators = [torch.Generator().manual_seed(args.seed) for _ in range(2)]  # loader order, weighted draws
    counts = np.bincount(data["labels"][train_idx], minlength=len(data["classes"]))
    sampler = None
    if args.sampler == "weighted":
        sampler = WeightedRandomSampler(1.0 / counts[data["labels"][train_idx]], len(train_idx), generator=generators[1])
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(train_idx) > args.batch_size, generator=generators[0], **loader_kw)
    return SimpleNamespace(layout=layout, classes=data["classes"], class_counts=counts, size=size, mean=mean, std=std, workers=workers, generators=generators,
                           normalize=Normalize(mean, std).to(device), augment=dataset.create_transform(args.augmentation),
                           train_loader=train_loader, val_set=val_set, val_loader=DataLoader(val_set, args.valid_batch_size, **loader_kw),
                           eval_ids=eval_ids, eval_paths=eval_paths)


def build_optimisation(args, data, model, device):
    """Loss, optimiser, schedule and mixed precision -> a namespace."""
    optimizer = create_optimizer(args.optimizer, [p for p in model.parameters() if p.requires_grad],
                                 args.lr, args.weight_decay, args.momentum)
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if args.amp and device.type == "cuda" else None
    return SimpleNamespace(
        criterion=create_criterion(args.criterion, args.classification, focal_gamma=args.focal_gamma, smoothing=args.smoothing,
                                   class_counts=data.class_counts).to(device),
        optimizer=optimizer, amp_dtype=amp_dtype, scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        scheduler=create_scheduler(args.scheduler, optimizer, args.epochs, args.lr_decay_step, args.milestones, args.lr_gamma,
                                   args.warmup_epochs))


def open_run_dir(args, data, model, opt, device):
    """The run directory (the resumed one, NNI's, or the next free runs/<name>) with config.json written,
    and where training starts: dict(epoch, best, history, stale); a resumed run's state is loaded first."""
    start = dict(epoch=1, best=-math.inf, history=[], stale=0)
    if args.resume:
        run_dir = Path(args.resume).parent
        start = restore(checkpoint.read(args.resume, device), args, data, model, opt)
        print(f"resuming {run_dir} at epoch {start['epoch']}", flush=True)
    elif UNDER_NNI:
        run_dir = Path(os.environ["NNI_OUTPUT_DIR"])
    else:
        run_dir = increment_path(Path(args.model_dir) / args.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir / "config.json", run_config(args))
    return run_dir, start


def restore(state, args, data, model, opt):
    """last.pth -> model, optimiser, schedule (re-planned for this run's --epochs), random state -> where to start."""
    missing = [k for k in ("optimizer", "scheduler", "history", "epoch", "best_metric") if k not in state]
    if missing:
        raise ValueError(f"--resume {args.resume}: not a last.pth (no {', '.join(missing)}); only last.pth can be resumed")
    try:
        model.load_state_dict(state["state_dict"])
        opt.optimizer.load_state_dict(state["optimizer"])
        if isinstance(opt.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            opt.scheduler.load_state_dict(state["scheduler"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"--resume {args.resume}: does not fit the run's model and optimiser "
                         f"({checkpoint.one_line_reason(e)})") from None
    done = state["epoch"]
    if isinstance(opt.scheduler, torch.optim.lr_scheduler.LambdaLR):
        opt.scheduler.base_lrs, opt.scheduler.last_epoch = [args.lr] * len(opt.optimizer.param_groups), done
        for group, factor in zip(opt.optimizer.param_groups, opt.scheduler.lr_lambdas):
            group["lr"] = args.lr * factor(done)
    train_state = state.get("train_state") or {}
    if train_state.get("rng"):
        set_rng_state(train_state["rng"], data)
    return dict(epoch=done + 1, best=state["best_metric"], history=state["history"], stale=train_state.get("stale", 0))


def rng_state(data):
    """Every random stream training draws from, as plain types (last.pth loads with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=random.getstate(), numpy=[name, keys.tolist(), pos, has_gauss, cached], torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
                loaders=[g.get_state() for g in data.generators])


def set_rng_state(state, data):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for generator, saved in zip(data.generators, state["loaders"]):
        generator.set_state(saved)


def resume_hint(run_dir):
    """The truth about what an interrupted run left, read from disk."""
    last = run_dir / "last.pth"
    if not last.is_file():
        return "no epoch finished, so there is nothing to resume"
    return f"{last} holds epoch {checkpoint.read_meta(last)['epoch']}: continue with --resume {last}"


def run_config(args):
    """The resolved flags, re-runnable with --config."""
    return {k: v for k, v in vars(args).items() if k not in ("config", "resume", "print_flags")}


def fit(args, data, model, opt, run_dir, start, device):
    """Train from start['epoch'] to --epochs (or early stopping); checkpoints, history, TensorBoard and NNI
    reports every epoch. -> the best validation metric."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(run_dir / "tensorboard", purge_step=start["epoch"] if args.resume else None)
    print(f"run dir {run_dir} | {len(data.train_loader.dataset)} train / {len(data.val_set)} val images, "
          f"{len(data.classes)} classes | {args.model} on {device}", flush=True)
    meta = dict(model=args.model, classification=args.classification, head=args.head, dropout=args.dropout, classes=data.classes,
                layout=data.layout, resize=list(data.size), mean=data.mean, std=data.std, metric=args.metric, args=run_config(args))
    best, history, stale, best_val, final_sent = start["best"], start["history"], start["stale"], None, False
    if UNDER_NNI:
        import nni
    try:
        for epoch in range(start["epoch"], args.epochs + 1):
            row, val = run_epoch(args, data, model, opt, epoch, device, first=epoch == start["epoch"])
            metric = row[f"val_{args.metric}"]
            improved = metric > best
            best, stale, best_val = (metric, 0, (epoch, val)) if improved else (best, stale + 1, best_val)
            history.append(row)
            with stop_signals_deferred():  # best.pth, last.pth and history.csv describe the same epoch, or none do
                if improved:
                    checkpoint.save(run_dir / "best.pth", model, meta, epoch=epoch, best_metric=best)
                checkpoint.save(run_dir / "last.pth", model, meta, epoch=epoch, best_metric=best, history=history,
                                optimizer=opt.optimizer.state_dict(), scheduler=opt.scheduler.state_dict(),
                                train_state=dict(stale=stale, rng=rng_state(data)))
                write_history(run_dir / "history.csv", history)
            log_row(writer, row)
            writer.flush()  # a stopped trial keeps its curves: dying by the signal skips writer.close()
            if UNDER_NNI:
                nni.report_intermediate_result({"default": metric, "accuracy": row["val_accuracy"], "f1": row["val_f1"], "loss": row["val_loss"]})
            if args.early_stopping and stale >= args.early_stopping:
                print(f"early stopping: no better {args.metric} for {stale} epochs", flush=True)
                break
        if UNDER_NNI:  # before the figures and the eval prediction: a stop signal during those loses nothing
            with stop_signals_deferred():  # sent and marked sent, or neither
                nni.report_final_result(best)
                final_sent = True
    except KeyboardInterrupt:
        if UNDER_NNI and history and not final_sent:  # an assessor's stop: the tuner (TPE) still learns how far this got
            with contextlib.suppress(Exception):  # whatever NNI says, the trial must still end by the signal
                nni.report_final_result(best)
        raise
    if best_val:  # once, at the end: drawing them at every new best cost seconds per epoch
        log_figures(writer, best_val[1], data.val_set, data.classes, best_val[0])
    writer.close()
    print(f"best val {args.metric} {best:.4f} -> {run_dir / 'best.pth'}", flush=True)
    rise = still_rising([row[f"val_{args.metric}"] for row in history])
    if rise:
        window, before, last = rise
        print(f"warning: val {args.metric} was still rising when training ended ({before:.4f} -> {last:.4f} over the "
              f"last {window} epochs): train longer, e.g. --epochs {2 * args.epochs}", file=sys.stderr, flush=True)
    return best


def still_rising(values, window=3, min_rise=0.01):
    """(window, from, to) when the last value is the best and beats the one `window` epochs before by min_rise or more."""
    if len(values) <= window or values[-1] < max(values) or values[-1] - values[-1 - window] < min_rise:
        return None
    return window, values[-1 - window], values[-1]


def run_epoch(args, data, model, opt, epoch, device, first):
    """Train one epoch, validate, step the schedule -> (history row, validation outputs).
    A diverged model (non-finite validation loss or weights) stops the run before anything is saved."""
    t0, lr = time.time(), opt.optimizer.param_groups[0]["lr"]  # the LR this epoch trains at
    train_stats = train_one_epoch(model, data.train_loader, device=device, augment=data.augment, normalize=data.normalize,
                                  criterion=opt.criterion, optimizer=opt.optimizer, scaler=opt.scaler,
                                  classification=args.classification, amp_dtype=opt.amp_dtype, channels_last=args.channels_last,
                                  clip_grad=args.clip_grad, progress=make_progress(f"epoch {epoch}/{args.epochs}"), log_first_step=first)
    val = evaluate(model, data.val_loader, device=device, normalize=data.normalize, criterion=opt.criterion,
                   classification=args.classification, amp_dtype=opt.amp_dtype)
    if not math.isfinite(val["loss"]) or not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise FloatingPointError(f"epoch {epoch}: validation loss is {val['loss']:.4g} and the weights are not all finite: "
                                 f"training diverged (try a lower --lr); nothing of this epoch was saved")
    scores = score(val["labels"], val["preds"], len(data.classes), per_task=data.layout == "mask")
    opt.scheduler.step(scores[args.metric]) if args.scheduler == "plateau" else opt.scheduler.step()
    row = dict(epoch=epoch, train_loss=train_stats["loss"], train_accuracy=train_stats["accuracy"],
               train_images_per_s=train_stats["images_per_s"], val_loss=val["loss"], **{f"val_{k}": v for k, v in scores.items()},
               lr=lr, seconds=time.time() - t0)
    return row, val


def predict_eval(args, data, model, run_dir, device):
    """best.pth on the eval dir -> submission.csv and submission_soft.csv in the run directory."""
    model.load_state_dict(checkpoint.read(run_dir / "best.pth", device)["state_dict"])
    images = dataset.load_images(data.eval_paths, data.size, args.cache_dir, not args.no_cache, make_progress("decoding eval images"))
    loader = DataLoader(ImageDataset(data.eval_paths, data.size, images), args.valid_batch_size, num_workers=data.workers)
    probs = predict(model, loader, device=device, normalize=data.normalize, classification=args.classification,
                    progress=make_progress("predicting"))
    write_submission(run_dir, data.eval_ids, probs, data.classes)
    print(f"wrote {run_dir / 'submission.csv'} and submission_soft.csv ({len(data.eval_ids)} images)", flush=True)


# ----------------------------------------------------------------------------- logging
def log_row(writer, row):
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


def log_figures(writer, val, val_set, classes, epoch, n=16):
    """Confusion matrix and a grid of validation images titled prediction/truth, drawn with PIL (see confusion_image)."""
    from PIL import Image, ImageDraw, ImageFont
    matrix = confusion(val["labels"], val["preds"], len(classes))
    writer.add_image("val/confusion_matrix", np.asarray(confusion_image(matrix, classes)), epoch, dataformats="HWC")
    font = ImageFont.load_default(size=11)
    picks = np.linspace(0, len(val_set) - 1, min(n, len(val_set))).astype(int)
    h, w = val_set[0][0].shape[1:]
    cols, cell_w, cell_h = 4, max(w, int(max(font.getlength(f"pred {c}") for c in classes))) + 16, h + 34
    grid = Image.new("RGB", (cols * cell_w, math.ceil(len(picks) / cols) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, i in enumerate(picks):
        image, label = val_set[i]
        pred = int(val["preds"][i])
        x, y = (k % cols) * cell_w, (k // cols) * cell_h
        grid.paste(Image.fromarray(image.permute(1, 2, 0).numpy()), (x + (cell_w - w) // 2, y + 30))
        draw.multiline_text((x + cell_w / 2, y + 2), f"pred {classes[pred]}\ntrue {classes[label]}", font=font, anchor="ma",
                            align="center", fill=(0, 128, 0) if pred == label else (200, 0, 0))
    writer.add_image("val/predictions", np.asarray(grid), epoch, dataformats="HWC")


# ----------------------------------------------------------------------------- entry point
# SIGINT (Ctrl-C; NNI's trial keeper) and SIGTERM (NNI's local mode) end the run within seconds by raising
# KeyboardInterrupt, except while an epoch's files are written: then the signal waits for the last file.
STOP = {"deferring": False, "pending": None}


def on_stop_signal(signum, frame):
    if STOP["deferring"]:
        STOP["pending"] = signum
    else:
        raise KeyboardInterrupt(signum)


@contextlib.contextmanager
def stop_signals_deferred():
    STOP["deferring"] = True
    try:
        yield
    finally:
        STOP["deferring"] = False
    if STOP["pending"] is not None:
        signum, STOP["pending"] = STOP["pending"], None
        raise KeyboardInterrupt(signum)


def cli(argv=None):
    # Installed explicitly: a shell script's background job starts with SIGINT ignored, and Python keeps that.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_stop_signal)
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return run_main("train.py", lambda a: main(parse_args(a)), argv,
                        errors=(DataError, WeightsError, FloatingPointError, torch.OutOfMemoryError))
    except KeyboardInterrupt as e:
        notes = getattr(e, "__notes__", None) or ["stopped before training started"]
        print(f"train.py: interrupted; {' '.join(notes)}", file=sys.stderr, flush=True)
        # Die by the signal, as Python does for an uncaught Ctrl-C: NNI's trial keeper (remote mode)
        # calls any exit code a FAILED trial, and only an exit by signal a cancelled/early-stopped one.
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        sys.stdout.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum  # not reached unless the signal is blocked


if __name__ == "__main__":
    code = cli()
    if code:  # an error may leave loader workers that only the normal exit stops
        sys.exit(code)
    # Every file is written and closed by now. Skip the interpreter's teardown of torch's, nni's and
    # dynamo's modules: 1.1 s on a 2-core CPU, a second of every NNI trial's slot.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
