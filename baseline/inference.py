"""Predict an eval dir with one or more train.py checkpoints -> submission.csv + submission_soft.csv.

    python baseline/inference.py --checkpoint runs/exp/best.pth --eval_dir data/demo/eval --out runs/inference
    python baseline/inference.py --checkpoint runs/exp/best.pth --eval_dir DATA/eval --tta --device cuda
    python baseline/inference.py --checkpoint runs/kfold/fold*/best.pth --eval_dir DATA/eval --out runs/kfold_tta --tta

Everything the model needs (backbone, head design, classes, input size, mean/std,
layout) is read from the checkpoint, so no training flag is repeated here. An .onnx file
that imgcls-export wrote runs the same way, under onnxruntime (CUDA where installed),
fed as its metadata says.
Several checkpoints are soft-voted: their class probabilities are averaged, so
they must share the class list (they may differ in backbone, head design and
input size). --tta also averages the horizontally flipped view of every image.
submission.csv holds the class index for the mask layout and the class name for
the class-per-folder layout; submission_soft.csv one probability column per class.
"""
import argparse
import sys
from pathlib import Path

import torch

from core.cli import Parser, UserError, run_main
from core.files import check_output
from core.runs import SUBMISSION, write_submission
from imagedata.constants import DEFAULT_CACHE_DIR
from imagedata.layouts import DataError
from training.engine import resolve_device, usable_cores
from training.predict import predict_checkpoints


def build_parser():
    p = Parser(prog="inference.py", description="Predict an eval dir with train.py checkpoints (several = soft vote).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="best.pth / last.pth files, or .onnx files imgcls-export wrote (run by onnxruntime); several are soft-voted")
    p.add_argument("--eval_dir", required=True,
                   help="mask layout: DATA/eval (info.csv + images/); folder or CSV data set: a folder of images, or a CSV of "
                        "image ids (the images under its folder)")
    p.add_argument("--out", default="runs/inference", help="where submission.csv and submission_soft.csv go")
    p.add_argument("--tta", action="store_true", help="also average the horizontally flipped view")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    p.add_argument("--num_workers", type=int, default=-1, help="loader workers (-1 = from the CPU count)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when available")
    p.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR), help="decoded-image cache (shared with train.py)")
    p.add_argument("--no_cache", action="store_true", help="decode images on the fly instead of caching them")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        raise UserError("--batch_size must be positive")
    check_output(f"--out {args.out}", args.out, folder=True)  # now, not after every image is predicted
    image_ids, probs, classes, layout = predict_checkpoints(
        args.checkpoint, args.eval_dir, device=resolve_device(args.device), tta=args.tta, batch_size=args.batch_size,
        num_workers=args.num_workers, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_submission(out, image_ids, probs, classes)
    vote = f"soft vote of {len(args.checkpoint)} checkpoints" if len(args.checkpoint) > 1 else "1 checkpoint"
    print(f"wrote {out / SUBMISSION} and submission_soft.csv ({len(image_ids)} images, {vote}"
          f"{', flip TTA' if args.tta else ''})", flush=True)


def cli(argv=None):
    torch.set_num_threads(usable_cores())
    return run_main("inference.py", main, argv, errors=(DataError,))


if __name__ == "__main__":
    sys.exit(cli())
