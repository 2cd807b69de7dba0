"""Prediction, the one way: a model and its description (a checkpoint's resize, mean, std, classification) over
images -> class probabilities (predict_images), which train.py, inference, kfold and finalize's soup all call; a fold
checkpoint's split rebuilt and checked (fold_split); the soft vote of checkpoints over an eval dir
(predict_checkpoints), everything checked before the first model runs."""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import dataset
from core import demo
from core.cli import make_progress
from core.folds import check_held_out
from core.runs import VAL_SOFT
from imagedata.augment import Normalize
from imagedata.constants import DEFAULT_CACHE_DIR
from imagedata.decode import load_images
from imagedata.feed import ImageDataset, loader_workers
from imagedata.layouts import read_eval
from training import checkpoint
from training.engine import predict


def image_loader(paths, size, images, *, indices=None, batch_size=256, num_workers=-1, device="cpu"):
    """Batches of decoded images (images: the decoded array, or None to decode each on the fly), in order."""
    device = torch.device(device)
    return DataLoader(ImageDataset(paths, size, images, indices=indices), batch_size,
                      num_workers=loader_workers(num_workers, images is not None, device), pin_memory=device.type == "cuda")


def predict_images(model, meta, paths, *, device, images=None, indices=None, tta=False, batch_size=256, num_workers=-1,
                   cache_dir=DEFAULT_CACHE_DIR, use_cache=True, label=None):
    """A model's class probabilities (N, C) for the images at paths (indices: those only), decoded at its input size
    unless images (the decoded array) is given, normalised with its mean/std; tta averages the flipped view; label:
    the progress bar's. meta: what the checkpoint says of the model (resize, mean, std, classification)."""
    device, size = torch.device(device), tuple(meta["resize"])
    if images is None:
        images = load_images(paths, size, cache_dir, use_cache, make_progress(f"decoding {size[0]}x{size[1]}"))
    loader = image_loader(paths, size, images, indices=indices, batch_size=batch_size, num_workers=num_workers, device=device)
    return predict(model, loader, device=device, normalize=Normalize(meta["mean"], meta["std"]).to(device),
                   classification=meta["classification"], tta=tta, progress=make_progress(label) if label else None)


def fold_split(meta, fold_dirs):
    """A --kfold run's split rebuilt from its checkpoint's own flags (dataset.read_split, as train.py split), and
    checked against the images each of fold_dirs held out when it trained (their val_soft.csv): the data dir may
    have changed since. -> (layout, data, train_idx, val_idx, the held-out ids relative to the data dir)."""
    a = meta["args"]
    if not a.get("kfold"):
        raise ValueError(f"{fold_dirs[0]}: not trained with --kfold, so it has no out-of-fold part")
    data_dir, _ = demo.data_dirs(a["data_dir"], None, make=False)
    layout, data, train_idx, val_idx = dataset.read_split(a["dataset"], data_dir, a["age_bounds"], a["val_ratio"], a["seed"],
                                                          a["kfold"], a["fold"])
    ids = [Path(data["paths"][i]).relative_to(data_dir).as_posix() for i in val_idx]
    for folder in fold_dirs:
        check_held_out(Path(folder) / VAL_SOFT, ids, data["truth"][val_idx], str(folder))
    return layout, data, train_idx, val_idx, ids


def check_compatible(paths, metas):
    """Soft voting averages column j of every model: refuse unless column j means the same class everywhere."""
    first, ref = paths[0], metas[0]
    for path, meta in zip(paths[1:], metas[1:]):
        if meta["classes"] != ref["classes"]:
            raise ValueError(f"checkpoints disagree on classes: {first} has {len(ref['classes'])} "
                             f"({', '.join(map(str, ref['classes'][:4]))}, ...), {path} has {len(meta['classes'])} "
                             f"({', '.join(map(str, meta['classes'][:4]))}, ...); only models of one task can be soft-voted")
        if meta["layout"] != ref["layout"]:
            raise ValueError(f"checkpoints disagree on the data layout: {first} is {ref['layout']}, {path} is {meta['layout']}")


def say(line):
    print(line, flush=True)


def predict_checkpoints(checkpoints, eval_dir, *, device="cpu", tta=False, batch_size=256, num_workers=-1,
                        cache_dir=DEFAULT_CACHE_DIR, use_cache=True, log=say):
    """Soft vote of the checkpoints over an eval dir -> (image_ids, probs (N, C), classes, layout).
    Everything is checked (files, classes, eval dir) before the first model runs."""
    checkpoints = [Path(p) for p in checkpoints]
    if not checkpoints:
        raise ValueError("no checkpoint given")
    metas = [checkpoint.read_meta(p) for p in checkpoints]
    check_compatible(checkpoints, metas)
    classes, layout = metas[0]["classes"], metas[0]["layout"]
    image_ids, paths = read_eval(eval_dir, layout, f"checkpoint {checkpoints[0]} ({len(classes)} classes)")
    device = torch.device(device)

    total = np.zeros((len(paths), len(classes)), dtype=np.float64)
    decoded = {}  # input size -> images: checkpoints of one size share one decode
    for path, meta in zip(checkpoints, metas):
        size = tuple(meta["resize"])
        if size not in decoded:
            decoded[size] = load_images(paths, size, cache_dir, use_cache, make_progress(f"decoding {size[0]}x{size[1]}"))
        model, ckpt = checkpoint.load_model(path, device)
        total += predict_images(model, ckpt, paths, device=device, images=decoded[size], tta=tta, batch_size=batch_size,
                                num_workers=num_workers, label=f"predicting {path}")
        metric = ckpt.get("metric")
        best = f", best val {metric} {ckpt['best_metric']:.4f}" if metric and "best_metric" in ckpt else ""
        log(f"{path}: {ckpt['model']} ({ckpt['classification']}) {size[0]}x{size[1]}, epoch {ckpt.get('epoch', '?')}{best}")
        del model
    return image_ids, (total / len(checkpoints)).astype(np.float32), classes, layout
