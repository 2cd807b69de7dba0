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
names) and the run directory is $NNI_OUTPUT_DIR.
"""
import argparse
import csv
import json
import math
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

import dataset
from dataset import DATASETS, TRANSFORMS, DataError, ImageDataset, Normalize
from loss import LOSSES, create_criterion, finite_loss
from metrics import confusion, confusion_figure, score
from model import CLASSIFICATIONS, INITS, MODELS, WeightsError, class_log_probs, create_model, num_outputs

OPTIMIZERS = {
    "SGD": lambda params, lr, weight_decay, momentum: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay),
    "Adam": lambda params, lr, weight_decay, momentum: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
    "AdamW": lambda params, lr, weight_decay, momentum: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
}

SCHEDULERS = {
    "none": lambda opt, epochs, step, milestones, gamma: None,
    "step": lambda opt, epochs, step, milestones, gamma: torch.optim.lr_scheduler.StepLR(opt, step, gamma),
    "multistep": lambda opt, epochs, step, milestones, gamma: torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma),
    "cosine": lambda opt, epochs, step, milestones, gamma: torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs)),
    "plateau": lambda opt, epochs, step, milestones, gamma: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "max", gamma, patience=step),
}


def create_optimizer(name, params, lr, weight_decay=0.0, momentum=0.9):
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay, momentum=momentum)


def create_scheduler(name, optimizer, epochs, lr_decay_step=20, milestones=(10, 20, 25), gamma=0.1):
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](optimizer, epochs=epochs, step=lr_decay_step, milestones=list(milestones), gamma=gamma)


# ----------------------------------------------------------------------------- arguments
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + line
        self.exit(2, f"{self.prog}: error: {message}\n")


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

    g = p.add_argument_group("model")
    g.add_argument("--model", default="BaseModel", choices=list(MODELS), help="backbone")
    g.add_argument("--classification", default="single", choices=CLASSIFICATIONS,
                   help="single 18-way head, or multi_head = mask/gender/age heads (mask layout)")
    g.add_argument("--head", default="none", help="hidden layers of the head, e.g. 512-256 (BN, ReLU, dropout each)")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout in the head")
    g.add_argument("--init", default="default", choices=INITS, help="weight init of new layers")
    g.add_argument("--pretrained", action="store_true", help="start from ImageNet weights (downloads unless --weights)")
    g.add_argument("--weights", default=None, help="offline ImageNet weights file for the backbone")
    g.add_argument("--freeze_backbone", action="store_true", help="train the head only")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=12, help="epochs")
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
    g.add_argument("--criterion", default="cross_entropy", choices=list(LOSSES), help="loss")
    g.add_argument("--focal_gamma", type=float, default=2.0, help="focal loss gamma")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--metric", default="accuracy", choices=["accuracy", "f1"], help="picks the best checkpoint; NNI's 'default'")
    g.add_argument("--early_stopping", type=int, default=0, help="stop after N epochs without improvement (0 = off)")

    g = p.add_argument_group("run")
    g.add_argument("--name", default="exp", help="run name: runs/<name>, incremented (exp2, exp3, ...)")
    g.add_argument("--model_dir", default="runs", help="where runs go")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when available")
    g.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bf16 where supported, else fp16)")
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format on CUDA")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--config", default=None, help="JSON/YAML file of flag values (keys = dest names); flags override it")
    g.add_argument("--resume", default=None, help="last.pth of a run to continue in its directory")
    return p


def coerce(action, value):
    """A value from a config file or NNI -> the type its flag would give, or ValueError."""
    key = action.dest
    if isinstance(action, argparse._StoreTrueAction):
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
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = path.read_text()
    if path.suffix in (".yml", ".yaml"):
        import yaml
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    return data


def parse_args(argv=None):
    """Flags over (--config file or the resumed run's config) over defaults; then NNI's parameters on top."""
    parser = build_parser()
    args = parser.parse_args(argv)
    base = vars(parser.parse_args([]))
    explicit = {k: v for k, v in vars(args).items() if v != base[k]}
    if args.resume:
        if not Path(args.resume).is_file():
            raise ValueError(f"--resume {args.resume}: no such file")
        saved = torch.load(args.resume, map_location="cpu", weights_only=False)["args"]
        args = apply_params(parser, argparse.Namespace(**base), saved, f"--resume {args.resume}")
    elif args.config:
        args = apply_params(parser, argparse.Namespace(**base), read_config(args.config), f"--config {args.config}")
    vars(args).update(explicit)
    if "NNI_PLATFORM" in os.environ:
        import nni
        apply_params(parser, args, nni.get_next_parameter() or {}, "NNI parameters")
    check_args(args)
    return args


def check_args(args):
    if min(args.resize) <= 0:
        raise ValueError(f"--resize {args.resize[0]} {args.resize[1]}: sizes must be positive")
    if not 0 < args.val_ratio < 1:
        raise ValueError(f"--val_ratio {args.val_ratio}: must be between 0 and 1")
    if args.kfold and not (args.kfold >= 2 and 0 <= args.fold < args.kfold):
        raise ValueError(f"--kfold {args.kfold} --fold {args.fold}: need K >= 2 and 0 <= fold < K")
    for key in ("epochs", "batch_size", "valid_batch_size"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key} must be positive")
    if args.lr <= 0:
        raise ValueError(f"--lr {args.lr}: must be positive")
    if args.weights and not Path(args.weights).is_file():
        raise ValueError(f"--weights {args.weights}: no such file")
    if args.classification == "multi_head" and DATASETS[args.dataset][0] != "mask":
        raise ValueError(f"--classification multi_head needs a mask-layout dataset, not {args.dataset}")


# ----------------------------------------------------------------------------- main
def main(args):
    under_nni = "NNI_PLATFORM" in os.environ
    if under_nni:
        import nni
    seed_everything(args.seed)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    torch.backends.cudnn.benchmark = True

    # -- data (read and checked before anything is written)
    data_dir, eval_dir = args.data_dir, args.eval_dir
    if data_dir is None:
        if DATASETS[args.dataset][0] != "mask":
            raise ValueError(f"--dataset {args.dataset} needs --data_dir (the demo data is in the mask layout)")
        demo = dataset.ensure_demo_data()
        data_dir, eval_dir = demo / "train", eval_dir or demo / "eval"
    layout, data, splitter = dataset.create_dataset(args.dataset, data_dir, tuple(args.age_bounds))
    classes, size = data["classes"], tuple(args.resize)
    train_idx, val_idx = splitter(data, args.val_ratio, args.seed, args.kfold, args.fold)
    eval_ids, eval_paths = dataset.read_eval(eval_dir, layout) if eval_dir else (None, None)
    progress = make_progress("decoding images")
    images = dataset.load_images(data["paths"], size, args.cache_dir, not args.no_cache, progress)
    mean, std = dataset.mean_std(images, data["paths"], size)
    normalize = Normalize(mean, std).to(device)

    # From the cache a batch is a ~1 ms gather that workers would only slow down with
    # inter-process copies on a CPU; decoding (--no_cache) and feeding a GPU want workers.
    cpus = os.cpu_count() or 1
    workers = args.num_workers if args.num_workers >= 0 else 0 if images is not None and device.type == "cpu" else min(8, cpus)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                     worker_init_fn=worker_init)
    train_set = ImageDataset(data["paths"], size, images, data["labels"], train_idx)
    val_set = ImageDataset(data["paths"], size, images, data["labels"], val_idx)
    augment = dataset.create_transform(args.augmentation)
    sampler = None
    if args.sampler == "weighted":
        counts = np.bincount(data["labels"][train_idx], minlength=len(classes))
        sampler = WeightedRandomSampler(1.0 / counts[data["labels"][train_idx]], len(train_idx),
                                        generator=torch.Generator().manual_seed(args.seed))
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=len(train_idx) > args.batch_size,
                              generator=torch.Generator().manual_seed(args.seed), **loader_kw)
    val_loader = DataLoader(val_set, args.valid_batch_size, **loader_kw)

    # -- model, loss, optimiser
    model = create_model(args.model, num_outputs(args.classification, len(classes)), head=args.head, dropout=args.dropout,
                         init=args.init, pretrained=args.pretrained, weights=args.weights, freeze_backbone=args.freeze_backbone)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    criterion = create_criterion(args.criterion, args.classification, focal_gamma=args.focal_gamma, smoothing=args.smoothing)
    optimizer = create_optimizer(args.optimizer, [p for p in model.parameters() if p.requires_grad],
                                 args.lr, args.weight_decay, args.momentum)
    scheduler = create_scheduler(args.scheduler, optimizer, args.epochs, args.lr_decay_step, args.milestones, args.lr_gamma)
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if args.amp and device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    # -- run directory
    start_epoch, best, history = 1, -math.inf, []
    if args.resume:
        run_dir = Path(args.resume).parent
        state = torch.load(args.resume, map_location=device, weights_only=False)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"] + 1, state["best_metric"], state["history"]
        print(f"resuming {run_dir} at epoch {start_epoch}", flush=True)
    elif under_nni:
        run_dir = Path(os.environ["NNI_OUTPUT_DIR"])
    else:
        run_dir = increment_path(Path(args.model_dir) / args.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("config", "resume")}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(run_dir / "tensorboard", purge_step=start_epoch if args.resume else None)
    print(f"run dir {run_dir} | {len(train_idx)} train / {len(val_idx)} val images, {len(classes)} classes | "
          f"{args.model} on {device}", flush=True)

    meta = dict(model=args.model, classification=args.classification, head=args.head, dropout=args.dropout,
                classes=classes, layout=layout, resize=list(size), mean=mean, std=std, metric=args.metric, args=config)
    stale = 0
    for epoch in range(start_epoch, args.epochs + 1):
        t0 = time.time()
        train_stats = train_one_epoch(model, train_loader, augment, normalize, criterion, optimizer, scaler, device, args.classification, amp_dtype,
                                      args.channels_last, make_progress(f"epoch {epoch}/{args.epochs}"), epoch == start_epoch)
        val = evaluate(model, val_loader, normalize, criterion, device, args.classification, amp_dtype)
        scores = score(val["labels"], val["preds"], len(classes), per_task=layout == "mask")
        metric = scores[args.metric]
        if scheduler is not None:
            scheduler.step(metric) if args.scheduler == "plateau" else scheduler.step()
        row = dict(epoch=epoch, train_loss=train_stats["loss"], train_accuracy=train_stats["accuracy"],
                   train_images_per_s=train_stats["images_per_s"], val_loss=val["loss"],
                   **{f"val_{k}": v for k, v in scores.items()}, lr=optimizer.param_groups[0]["lr"], seconds=time.time() - t0)
        history.append(row)
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key.replace("_", "/", 1), value, epoch)
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

        improved = metric > best
        if improved:
            best, stale = metric, 0
            save_checkpoint(run_dir / "best.pth", model, meta, epoch=epoch, best_metric=best)
            log_figures(writer, val, val_set, classes, epoch)
        else:
            stale += 1
        save_checkpoint(run_dir / "last.pth", model, meta, epoch=epoch, best_metric=best, history=history,
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict() if scheduler else None)
        write_history(run_dir / "history.csv", history)
        writer.flush()  # a stopped trial keeps its curves: dying by the signal skips writer.close()
        if under_nni:
            nni.report_intermediate_result({"default": metric, "accuracy": scores["accuracy"], "f1": scores["f1"], "loss": val["loss"]})
        if args.early_stopping and stale >= args.early_stopping:
            print(f"early stopping: no better {args.metric} for {stale} epochs", flush=True)
            break
    writer.close()
    if under_nni:
        nni.report_final_result(best)
    print(f"best val {args.metric} {best:.4f} -> {run_dir / 'best.pth'}", flush=True)

    if eval_ids is not None:
        best_state = torch.load(run_dir / "best.pth", map_location=device, weights_only=False)
        model.load_state_dict(best_state["state_dict"])
        eval_images = dataset.load_images(eval_paths, size, args.cache_dir, not args.no_cache, make_progress("decoding eval images"))
        eval_loader = DataLoader(ImageDataset(eval_paths, size, eval_images), args.valid_batch_size, num_workers=workers)
        probs = predict(model, eval_loader, normalize, device, args.classification, progress=make_progress("predicting"))
        write_submission(run_dir, eval_ids, probs, classes, layout)
        print(f"wrote {run_dir / 'submission.csv'} and submission_soft.csv ({len(eval_ids)} images)", flush=True)
    return best, run_dir


def train_one_epoch(model, loader, augment, normalize, criterion, optimizer, scaler, device, classification,
                    amp_dtype=None, channels_last=False, progress=None, first_step_log=False):
    model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.time()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in (progress(loader) if progress else loader):
        x = x.to(device, non_blocking=True).float()
        if augment is not None:
            x = augment(x)
        x = normalize(x).contiguous(memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = finite_loss(criterion(logits.float(), y))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(y)
        correct += (class_log_probs(logits.detach(), classification).argmax(1) == y).sum().item()
        if not seen and first_step_log:
            print(f"first step {time.time() - process_start():.1f}s after process start", flush=True)
        seen += len(y)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "images_per_s": seen / (time.time() - start)}


@torch.no_grad()
def evaluate(model, loader, normalize, criterion, device, classification, amp_dtype=None):
    """Validation loss, predictions and class probabilities over a labelled loader."""
    model.eval()
    total_loss, labels, probs = 0.0, [], []
    for x, y in loader:
        y = y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(normalize(x.to(device))).float()
        total_loss += criterion(logits, y).item() * len(y)
        probs.append(class_log_probs(logits, classification).exp().cpu())
        labels.append(y.cpu())
    probs, labels = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return {"loss": total_loss / max(len(labels), 1), "labels": labels, "preds": probs.argmax(1), "probs": probs}


@torch.no_grad()
def predict(model, loader, normalize, device, classification, tta=False, progress=None):
    """Class probabilities for an unlabelled loader; tta averages the horizontally flipped view."""
    model.eval()
    out = []
    for x in (progress(loader) if progress else loader):
        x = normalize(x.to(device))
        p = class_log_probs(model(x), classification).exp()
        if tta:
            p = (p + class_log_probs(model(x.flip(3)), classification).exp()) / 2
        out.append(p.cpu())
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- helpers
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def process_start():
    """Wall-clock start of this process (start-up time is what many short trials pay)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def worker_init(worker_id):
    torch.set_num_threads(1)  # workers only slice and augment; the cores belong to the model
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_progress(desc):
    """tqdm bars when a person watches, plain log lines (one per epoch, printed by main) otherwise."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return lambda it: tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


def increment_path(path):
    """runs/exp -> runs/exp if free, else runs/exp2, runs/exp3, ..."""
    if not path.exists():
        return path
    taken = [int(m.group(1) or 1) for p in path.parent.glob(f"{path.name}*")
             if (m := re.fullmatch(re.escape(path.name) + r"(\d*)", p.name))]
    return path.with_name(f"{path.name}{max(taken) + 1}")


def save_checkpoint(path, model, meta, **extra):
    """Self-describing checkpoint, written to a temp file and renamed so a kill never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), **meta, **extra}, tmp)
    os.replace(tmp, path)


def write_history(path, history):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def write_submission(out_dir, image_ids, probs, classes, layout):
    """submission.csv (ImageID,ans: class index for the mask layout, class name otherwise)
    and submission_soft.csv (ImageID + one probability column per class, named by class)."""
    import pandas as pd
    out_dir = Path(out_dir)
    preds = probs.argmax(1)
    answers = preds if layout == "mask" else [classes[i] for i in preds]
    pd.DataFrame({"ImageID": image_ids, "ans": answers}).to_csv(out_dir / "submission.csv", index=False)
    soft = pd.DataFrame(probs, columns=classes)
    soft.insert(0, "ImageID", image_ids)
    soft.to_csv(out_dir / "submission_soft.csv", index=False, float_format="%.6f")


def log_figures(writer, val, val_set, classes, epoch, n=16):
    """Confusion matrix and a grid of validation images titled prediction/truth."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    writer.add_figure("val/confusion_matrix", confusion_figure(confusion(val["labels"], val["preds"], len(classes)), classes), epoch)
    picks = np.linspace(0, len(val_set) - 1, min(n, len(val_set))).astype(int)
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(picks) / cols), cols, figsize=(cols * 2.2, math.ceil(len(picks) / cols) * 2.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks):
        image, label = val_set[i]
        pred = val["preds"][i]
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"pred {classes[pred]}\ntrue {classes[label]}", fontsize=6, color="green" if pred == label else "red")
    fig.tight_layout()
    writer.add_figure("val/predictions", fig, epoch)


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def cli(argv=None):
    # NNI stops trials (assessor, user cancel) with SIGTERM: unwind like Ctrl-C so the run ends within seconds
    signal.signal(signal.SIGTERM, raise_interrupt)
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        main(parse_args(argv))
    except KeyboardInterrupt as e:
        print("train.py: interrupted; last.pth holds the last finished epoch", file=sys.stderr, flush=True)
        # Die by the signal, as Python does for an uncaught Ctrl-C: NNI's trial keeper (remote mode)
        # calls any exit code a FAILED trial, and only an exit by signal a cancelled/early-stopped one.
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        sys.stdout.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum  # not reached unless the signal is blocked
    except (DataError, ValueError, WeightsError, FloatingPointError, torch.OutOfMemoryError) as e:
        # a DataError raised in a loader worker arrives wrapped in the worker's traceback: keep its last line
        message = str(e).strip().splitlines()[-1].removeprefix("dataset.DataError: ")
        print(f"train.py: error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
