"""Predict an eval dir with one or more train.py checkpoints -> submission.csv + submission_soft.csv.

    python baseline/inference.py --checkpoint runs/exp/best.pth --eval_dir data/demo/eval --out runs/inference
    python baseline/inference.py --checkpoint runs/exp/best.pth --eval_dir DATA/eval --tta --device cuda
    python baseline/inference.py --checkpoint runs/kfold/fold*/best.pth --eval_dir DATA/eval --out runs/kfold_tta --tta

Everything the model needs (backbone, head design, classes, input size, mean/std,
layout) is read from the checkpoint, so no training flag is repeated here.
Several checkpoints are soft-voted: their class probabilities are averaged, so
they must share the class list (they may differ in backbone, head design and
input size). --tta also averages the horizontally flipped view of every image.
submission.csv holds the class index for the mask layout and the class name for
the class-per-folder layout; submission_soft.csv one probability column per class.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import dataset  # noqa: E402
from core.cli import Parser, make_progress, run_main  # noqa: E402
from core.runs import write_submission  # noqa: E402
from dataset import DataError, ImageDataset, Normalize, loader_workers  # noqa: E402
from training import checkpoint  # noqa: E402
from training.engine import predict, resolve_device  # noqa: E402


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
                        cache_dir=dataset.DEFAULT_CACHE_DIR, use_cache=True, log=say):
    """Soft vote of the checkpoints over an eval dir -> (image_ids, probs (N, C), classes, layout).
    Everything is checked (files, classes, eval dir) before the first model runs."""
    checkpoints = [Path(p) for p in checkpoints]
    if not checkpoints:
        raise ValueError("no checkpoint given")
    metas = [checkpoint.read_meta(p) for p in checkpoints]
    check_compatible(checkpoints, metas)
    classes, layout = metas[0]["classes"], metas[0]["layout"]
    image_ids, paths = dataset.read_eval(eval_dir, layout, f"checkpoint {checkpoints[0]} ({len(classes)} classes)")
    device = torch.device(device)
    workers = loader_workers(num_workers, use_cache, device)

    total = np.zeros((len(paths), len(classes)), dtype=np.float64)
    decoded = {}  # input size -> images: checkpoints of one size share one decode
    for path, meta in zip(checkpoints, metas):
        size = tuple(meta["resize"])
        if size not in decoded:
            decoded[size] = dataset.load_images(paths, size, cache_dir, use_cache, make_progress(f"decoding {size[0]}x{size[1]}"))
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


def build_parser():
    p = Parser(prog="inference.py", description="Predict an eval dir with train.py checkpoints (several = soft vote).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, help="best.pth / last.pth files; several are soft-voted")
    p.add_argument("--eval_dir", required=True, help="mask layout: DATA/eval (info.csv + images/); folder layout: a folder of images")
    p.add_argument("--out", default="runs/inference", help="where submission.csv and submission_soft.csv go")
    p.add_argument("--tta", action="store_true", help="also average the horizontally flipped view")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    p.add_argument("--num_workers", type=int, default=-1, help="loader workers (-1 = from the CPU count)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when available")
    p.add_argument("--cache_dir", default=str(dataset.DEFAULT_CACHE_DIR), help="decoded-image cache (shared with train.py)")
    p.add_argument("--no_cache", action="store_true", help="decode images on the fly instead of caching them")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        raise ValueError("--batch_size must be positive")
    image_ids, probs, classes, layout = predict_checkpoints(
        args.checkpoint, args.eval_dir, device=resolve_device(args.device), tta=args.tta, batch_size=args.batch_size,
        num_workers=args.num_workers, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_submission(out, image_ids, probs, classes)
    vote = f"soft vote of {len(args.checkpoint)} checkpoints" if len(args.checkpoint) > 1 else "1 checkpoint"
    print(f"wrote {out / 'submission.csv'} and submission_soft.csv ({len(image_ids)} images, {vote}"
          f"{', flip TTA' if args.tta else ''})", flush=True)


def cli(argv=None):
    torch.set_num_threads(os.cpu_count() or 1)
    return run_main("inference.py", main, argv, errors=(DataError,))


if __name__ == "__main__":
    sys.exit(cli())
