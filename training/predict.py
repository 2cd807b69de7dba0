"""Prediction, the one way: a model and its description (a checkpoint's resize, mean, std, classification) over
images -> class probabilities (predict_images), which train.py, inference, kfold and finalize's soup all call; a fold
checkpoint's split rebuilt and checked (fold_split); the soft vote of checkpoints (and exported .onnx files, run by
onnxruntime: predict_onnx) over an eval dir (predict_checkpoints), everything checked before the first model runs."""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import dataset
from core import demo
from core.cli import UserError, make_progress
from core.folds import check_held_out
from core.runs import VAL_SOFT
from imagedata.augment import Normalize
from imagedata.constants import DEFAULT_CACHE_DIR
from imagedata.decode import load_images
from imagedata.feed import ImageDataset, loader_workers
from imagedata.layouts import read_eval
from training import checkpoint, onnxfile
from training.engine import predict


def image_loader(paths, size, images, *, indices=None, batch_size=256, num_workers=-1, device="cpu"):
    """Batches of decoded images (images: the decoded array, or None to decode each on the fly), in order."""
    workers = loader_workers(num_workers, images is not None)
    return DataLoader(ImageDataset(paths, size, images, indices=indices), batch_size, num_workers=workers,
                      pin_memory=workers > 0 and torch.device(device).type == "cuda")


def predict_images(model, meta, paths, *, device, images=None, indices=None, tta=False, batch_size=256, num_workers=-1,
                   cache_dir=DEFAULT_CACHE_DIR, use_cache=True, label=None, amp_dtype=None, channels_last=False, pad_to=None):
    """A model's class probabilities (N, C) for the images at paths (indices: those only), decoded at its input size
    unless images (the decoded array) is given, normalised with its mean/std; tta averages the flipped view; label:
    the progress bar's. meta: what the checkpoint says of the model (resize, mean, std, classification). amp_dtype,
    channels_last, pad_to: engine.predict's."""
    device, size = torch.device(device), tuple(meta["resize"])
    if images is None:
        images = load_images(paths, size, cache_dir, use_cache, make_progress(f"decoding {size[0]}x{size[1]}"))
    loader = image_loader(paths, size, images, indices=indices, batch_size=batch_size, num_workers=num_workers, device=device)
    return predict(model, loader, device=device, normalize=Normalize(meta["mean"], meta["std"]).to(device),
                   classification=meta["classification"], tta=tta, progress=make_progress(label) if label else None,
                   amp_dtype=amp_dtype, channels_last=channels_last, pad_to=pad_to)


def fold_split(meta, fold_dirs):
    """A --kfold run's split rebuilt from its checkpoint's own flags (dataset.read_split, as train.py split), and
    checked against the images each of fold_dirs held out when it trained (their val_soft.csv): the data dir may
    have changed since. -> (layout, data, train_idx, val_idx, the held-out ids relative to the data dir)."""
    a = meta["args"]
    if not a.get("kfold"):
        raise UserError(f"{fold_dirs[0]}: not trained with --kfold, so it has no out-of-fold part")
    data_dir, _ = demo.data_dirs(a["data_dir"], None, make=False)
    layout, data, train_idx, val_idx = dataset.read_split(a["dataset"], data_dir, a["age_bounds"], a["val_ratio"], a["seed"],
                                                          a["kfold"], a["fold"], dataset.csv_options(a))
    ids = [Path(data["paths"][i]).relative_to(data_dir).as_posix() for i in val_idx]
    for folder in fold_dirs:
        check_held_out(Path(folder) / VAL_SOFT, ids, data["truth"][val_idx], str(folder))
    return layout, data, train_idx, val_idx, ids


def say(line):
    print(line, flush=True)


def input_sizes(path, meta):
    """The sizes a model's images are decoded at: a checkpoint's one, an exported file's one per input."""
    return [tuple(size) for size in meta["inputs"].values()] if onnxfile.is_onnx(path) else [tuple(meta["resize"])]


def predict_onnx(path, meta, paths, *, device, decoded, tta=False, batch_size=256, num_workers=-1):
    """An exported file's class probabilities (N, C) under onnxruntime, fed as its metadata says: the images decoded at
    each input's size (decoded: size -> the decoded array, or None to decode on the fly), uint8 NCHW. tta averages
    the flipped view unless the file already does so inside."""
    session = onnxfile.session(path, device)
    names = list(meta["inputs"])
    loaders = [image_loader(paths, tuple(meta["inputs"][n]), decoded.get(tuple(meta["inputs"][n])), batch_size=batch_size,
                            num_workers=num_workers) for n in names]
    out = []
    for batches in zip(*loaders):
        feed = {n: b.numpy() for n, b in zip(names, batches)}
        probs = session.run([meta["output"]], feed)[0]
        if tta and not meta["tta"]:
            flipped = {n: np.ascontiguousarray(x[..., ::-1]) for n, x in feed.items()}
            probs = (probs + session.run([meta["output"]], flipped)[0]) / 2
        out.append(probs)
    return np.concatenate(out)


def read_model_meta(path):
    return onnxfile.read_meta(path) if onnxfile.is_onnx(path) else checkpoint.read_meta(path)


def predict_one(path, meta, paths, decoded, *, device, tta, batch_size, num_workers):
    """One checkpoint or exported file over the decoded images -> (probs, the line that says what it was)."""
    if onnxfile.is_onnx(path):
        probs = predict_onnx(path, meta, paths, device=device, decoded=decoded, tta=tta, batch_size=batch_size, num_workers=num_workers)
        sizes = ", ".join(f"{h}x{w}" for h, w in meta["inputs"].values())
        n = len(meta["members"])
        return probs, (f"{path}: ONNX, {n} model{'s' if n > 1 else ''} ({', '.join(sorted({m['model'] for m in meta['members']}))}) "
                       f"{sizes}{', flip TTA inside' if meta['tta'] else ''}, exported from {meta['exported_from'] or '?'}")
    size = tuple(meta["resize"])
    model, ckpt = checkpoint.load_model(path, device)
    probs = predict_images(model, ckpt, paths, device=device, images=decoded[size], tta=tta, batch_size=batch_size,
                           num_workers=num_workers, label=f"predicting {path}")
    metric = ckpt.get("metric")
    best = f", best val {metric} {ckpt['best_metric']:.4f}" if metric and "best_metric" in ckpt else ""
    return probs, f"{path}: {ckpt['model']} ({ckpt['classification']}) {size[0]}x{size[1]}, epoch {ckpt.get('epoch', '?')}{best}"


def predict_checkpoints(checkpoints, eval_dir, *, device="cpu", tta=False, batch_size=256, num_workers=-1,
                        cache_dir=DEFAULT_CACHE_DIR, use_cache=True, log=say):
    """Soft vote of the checkpoints (exported .onnx files among them, run by onnxruntime) over an eval dir ->
    (image_ids, probs (N, C), classes, layout). Everything is checked (files, classes, eval dir) before the first
    model runs."""
    checkpoints = [Path(p) for p in checkpoints]
    if not checkpoints:
        raise UserError("no checkpoint given")
    metas = [read_model_meta(p) for p in checkpoints]
    checkpoint.check_compatible(checkpoints, metas)
    classes, layout = metas[0]["classes"], metas[0]["layout"]
    image_ids, paths = read_eval(eval_dir, layout, f"checkpoint {checkpoints[0]} ({len(classes)} classes)")
    device = torch.device(device)

    total = np.zeros((len(paths), len(classes)), dtype=np.float64)
    decoded = {}  # input size -> images: models of one size share one decode
    for path, meta in zip(checkpoints, metas):
        for size in input_sizes(path, meta):
            if size not in decoded:
                decoded[size] = load_images(paths, size, cache_dir, use_cache, make_progress(f"decoding {size[0]}x{size[1]}"))
        probs, line = predict_one(path, meta, paths, decoded, device=device, tta=tta, batch_size=batch_size, num_workers=num_workers)
        total += probs
        log(line)
    return image_ids, (total / len(checkpoints)).astype(np.float32), classes, layout
