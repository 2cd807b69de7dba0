"""Prediction with train.py checkpoints over an eval dir: the soft vote that inference.py and kfold.py share.
Everything is checked (files, classes, eval dir) before the first model runs."""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.cli import make_progress
from imagedata.augment import Normalize
from imagedata.constants import DEFAULT_CACHE_DIR
from imagedata.decode import load_images
from imagedata.feed import ImageDataset, loader_workers
from imagedata.layouts import read_eval
from training import checkpoint
from training.engine import predict


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
    workers = loader_workers(num_workers, use_cache, device)

    total = np.zeros((len(paths), len(classes)), dtype=np.float64)
    decoded = {}  # input size -> images: checkpoints of one size share one decode
    for path, meta in zip(checkpoints, metas):
        size = tuple(meta["resize"])
        if size not in decoded:
            decoded[size] = load_images(paths, size, cache_dir, use_cache, make_progress(f"decoding {size[0]}x{size[1]}"))
        model, ckpt = checkpoint.load_model(path, device)
        loader = DataLoader(ImageDataset(paths, size, decoded[size]), batch_size, num_workers=workers,
                            pin_memory=device.type == "cuda")
        probs = predict(model, loader, device=device, normalize=Normalize(ckpt["mean"], ckpt["std"]).to(device),
                        classification=ckpt["classification"], tta=tta, progress=make_progress(f"predicting {path}"))
        total += probs
        metric = ckpt.get("metric")
        best = f", best val {metric} {ckpt['best_metric']:.4f}" if metric and "best_metric" in ckpt else ""
        log(f"{path}: {ckpt['model']} ({ckpt['classification']}) {size[0]}x{size[1]}, epoch {ckpt.get('epoch', '?')}{best}")
        del model
    return image_ids, (total / len(checkpoints)).astype(np.float32), classes, layout
