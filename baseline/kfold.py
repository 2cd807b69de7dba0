"""Train all K folds (stratified group k-fold by profile), score them out of fold, soft-vote them on the eval dir.

    python baseline/kfold.py --k 5                                        # demo data -> runs/kfold
    python baseline/kfold.py --k 5 --name effb0 --eval_dir DATA/eval --tta -- --data_dir DATA/train --model efficientnet_b0
    python baseline/kfold.py --reuse runs/kfold --tta                     # re-score trained folds, no training
    python baseline/kfold.py --resume runs/kfold                          # after a full disk or a failed fold: the rest

Everything after `--` goes to every train.py run unchanged; kfold.py sets --kfold,
--fold, --name and --model_dir itself. The folds land side by side in
runs/<name>/fold{i}/ (best.pth, last.pth, history.csv, ...). Then:
  out of fold  each fold's best.pth predicts its own validation fold (the split is
               rebuilt from the checkpoint's saved flags with the same split
               function); the K parts cover every training image once, and their
               macro F1 is printed and saved with the probabilities in oof_soft.csv
  ensemble     the K best.pth files are soft-voted on the eval dir ->
               runs/<name>/submission.csv + submission_soft.csv
The eval dir is --eval_dir, else the one passed to train.py, else the demo eval split
when training on the demo data.
The out-of-fold score is slightly optimistic: each fold's validation part also picked its best epoch.
"""
import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core import demo
from core.cli import Parser, UserError, make_progress, run_main
from core.files import ROOT, read_mapping, replace_atomically
from core.folds import join_folds
from core.labels import TASKS, natural_key
from core.metrics import score
from core.runs import (BEST, KFOLD, KFOLD_SCORES, LAST, OOF_SOFT, SUBMISSION, SUMMARY, increment_path, read_summary, write_config,
                       write_submission)
from imagedata.decode import load_images
from imagedata.layouts import DataError, check_dir
from training import checkpoint, flags
from training.engine import resolve_device, usable_cores
from training.predict import fold_split, predict_checkpoints, predict_images, say




def split_argv(argv):
    """kfold.py's own flags | train.py's flags (after the first `--`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def check_train_args(train_args):
    owned = [f"--{dest}" for dest in flags.having("kfold")]
    for arg in train_args:
        flag = arg.split("=", 1)[0]
        if flag in owned:
            raise UserError(f"{flag} is set by kfold.py for every fold; remove it after --")


def train_folds(run_dir, k, train_args):
    """One train.py subprocess per fold; its log goes straight to this terminal. A fold that finished (summary.json) is
    kept, one with last.pth continues from it (--resume), one without is trained from the start."""
    for fold in range(k):
        fold_dir = run_dir / f"fold{fold}"
        if (fold_dir / SUMMARY).is_file():
            print(f"=== fold {fold}/{k - 1}: finished, kept ({fold_dir})", flush=True)
            continue
        if (fold_dir / LAST).is_file():
            print(f"=== fold {fold}/{k - 1}: continuing {fold_dir / LAST}", flush=True)
            cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(fold_dir / LAST)]
        else:
            print(f"=== fold {fold}/{k - 1}: train.py --kfold {k} --fold {fold} {' '.join(train_args)}", flush=True)
            shutil.rmtree(fold_dir, ignore_errors=True)  # no epoch of it was saved: nothing to keep, and its name stays free
            cmd = [sys.executable, str(ROOT / "train.py"), *train_args,
                   "--kfold", str(k), "--fold", str(fold), "--model_dir", str(run_dir), "--name", f"fold{fold}"]
        code = subprocess.call(cmd)
        if code != 0:
            raise UserError(f"fold {fold}: train.py exited with code {code} (its message is above); the folds trained so far "
                            f"are in {run_dir}: `kfold.py --resume {run_dir}` trains the rest"
                            + (f", fold {fold} from its last.pth" if (fold_dir / LAST).is_file() else ""))


def fold_checkpoints(run_dir):
    """The fold runs' best.pth, each from a run that finished (its summary.json says so and lists it)."""
    folds = sorted((p for p in Path(run_dir).glob("fold*") if p.is_dir()), key=lambda p: natural_key(p.name))
    if not folds:
        raise UserError(f"{run_dir}: no fold*/{BEST}")
    paths = []
    for fold in folds:
        if BEST not in read_summary(fold)["files"]:
            raise UserError(f"{fold}: its summary.json lists no best.pth")
        paths.append(fold / BEST)
    return paths


def out_of_fold(checkpoints, *, device, tta=False, batch_size=256, num_workers=-1, log=say):
    """Each fold's model on its own validation part -> dict(labels, probs, fold, paths, classes, layout, folds=[scores]).
    The split is the one train.py trained on, rebuilt from the checkpoint's flags and checked (fold_split)."""
    reference, parts, folds = None, [], []
    for path in checkpoints:
        model, ckpt = checkpoint.load_model(path, device)
        a = ckpt["args"]
        layout, data, _, val_idx, _ = fold_split(ckpt, [Path(path).parent])
        if reference is None:
            reference = dict(paths=data["paths"], classes=ckpt["classes"], layout=layout, split=(a["dataset"], a["kfold"], a["seed"]))
        elif data["paths"] != reference["paths"] or (a["dataset"], a["kfold"], a["seed"]) != reference["split"]:
            raise UserError(f"{path}: trained on other data or another split (dataset, K, seed) than {checkpoints[0]}; "
                            f"out-of-fold parts would not line up")
        size = tuple(ckpt["resize"])
        # the whole training set, as train.py cached it, so the cache file is reused instead of rebuilt per fold
        images = load_images(data["paths"], size, a["cache_dir"], not a["no_cache"], make_progress("decoding images"))
        probs = predict_images(model, ckpt, data["paths"], device=device, images=images, indices=val_idx, tta=tta,
                               batch_size=batch_size, num_workers=num_workers, label=f"fold {a['fold']}")
        parts.append((path, a["fold"], [data["paths"][i] for i in val_idx], data["truth"][val_idx], probs))
        scores = score(data["truth"][val_idx], probs.argmax(1), len(ckpt["classes"]), per_task=layout == "mask")
        folds.append(dict(fold=a["fold"], images=len(val_idx), epoch=ckpt["epoch"], **scores))
        log(f"fold {a['fold']}: {len(val_idx)} validation images, best epoch {ckpt['epoch']}, "
            f"accuracy {scores['accuracy']:.4f}, macro F1 {scores['f1']:.4f}")
        del model
    oof = join_folds(parts, expected=reference["paths"])
    return dict(reference, labels=oof["labels"], probs=oof["probs"].astype(np.float32), fold=oof["fold"], folds=folds,
                scores=score(oof["labels"], oof["probs"].argmax(1), len(reference["classes"]), per_task=reference["layout"] == "mask"))


def write_oof(path, result):
    table = pd.DataFrame(result["probs"], columns=result["classes"])
    table.insert(0, "label", result["labels"])
    table.insert(0, "fold", result["fold"])
    table.insert(0, "path", result["paths"])
    replace_atomically(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))


def resolve_eval_dir(eval_dir, fold_checkpoint):
    """--eval_dir, else the one given to train.py, else the demo eval split if train.py trained on the demo data."""
    a = checkpoint.read_meta(fold_checkpoint)["args"]
    return demo.data_dirs(a.get("data_dir"), eval_dir or a.get("eval_dir"), make=False)[1]


def build_parser():
    p = Parser(prog="kfold.py", description="Train K folds, score them out of fold and soft-vote them on the eval dir. "
                                            "train.py flags go after --.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--k", type=int, default=5, help="number of folds")
    p.add_argument("--name", default="kfold", help="runs/<name> (incremented: kfold2, ...) holds fold0..fold{K-1}")
    p.add_argument("--model_dir", default="runs", help="where the k-fold directory goes")
    p.add_argument("--reuse", default=None, help="a k-fold directory already trained: score and ensemble it, train nothing")
    p.add_argument("--resume", default=None, metavar="KFOLD_DIR",
                   help="a k-fold directory whose training stopped (a full disk, a failed fold, Ctrl-C): its finished folds "
                        "are kept, a fold with last.pth continues from it, the rest train (K and the train.py flags: its "
                        "kfold.json); then scored and voted")
    p.add_argument("--eval_dir", default=None, help="eval dir for the ensemble submission; unset = the one given to train.py, or the demo eval split")
    p.add_argument("--tta", action="store_true", help="average the flipped view (out of fold and on the eval dir)")
    p.add_argument("--batch_size", type=int, default=256, help="prediction batch size")
    p.add_argument("--num_workers", type=int, default=-1, help="prediction loader workers (-1 = from the CPU count)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="prediction device (train.py has its own --device)")
    return p


def main(argv=None):
    """Train the folds (or take --reuse's), score them out of fold, soft-vote them on the eval dir."""
    args, train_args = parse_args(argv)
    device = resolve_device(args.device)
    if args.reuse:
        run_dir = Path(args.reuse)
    elif args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / KFOLD).is_file():
            raise UserError(f"--resume {run_dir}: no {KFOLD} there, so not a kfold.py directory")
        saved = read_mapping(run_dir / KFOLD, f"--resume {run_dir}")
        train_folds(run_dir, saved["k"], saved["train_args"])
    else:
        run_dir = increment_path(Path(args.model_dir) / args.name)
        run_dir.mkdir(parents=True)
        write_config(run_dir / KFOLD, {"k": args.k, "train_args": train_args})
        train_folds(run_dir, args.k, train_args)
    checkpoints = fold_checkpoints(run_dir)

    print(f"=== out of fold ({len(checkpoints)} folds{', flip TTA' if args.tta else ''})", flush=True)
    result = out_of_fold(checkpoints, device=device, tta=args.tta, batch_size=args.batch_size, num_workers=args.num_workers)
    write_oof(run_dir / OOF_SOFT, result)
    s = result["scores"]
    tasks = "".join(f", {t} F1 {s[f'{t}_f1']:.4f}" for t in TASKS if f"{t}_f1" in s)
    print(f"out-of-fold ({len(result['labels'])} images): accuracy {s['accuracy']:.4f}, macro F1 {s['f1']:.4f}{tasks}", flush=True)
    summary = {"k": len(checkpoints), "tta": args.tta, "oof": s, "folds": result["folds"]}

    eval_dir = resolve_eval_dir(args.eval_dir, checkpoints[0])
    if eval_dir is None:
        print("no eval dir (give --eval_dir): no ensemble submission written", flush=True)
    else:
        print(f"=== soft vote of {len(checkpoints)} folds on {eval_dir}", flush=True)
        trained = checkpoint.read_meta(checkpoints[0])["args"]  # eval images go to the cache the folds used
        ids, probs, classes, _ = predict_checkpoints(checkpoints, eval_dir, device=device, tta=args.tta, batch_size=args.batch_size,
                                                     num_workers=args.num_workers, cache_dir=trained["cache_dir"],
                                                     use_cache=not trained["no_cache"])
        write_submission(run_dir, ids, probs, classes)
        summary["eval_dir"] = str(eval_dir)
        print(f"wrote {run_dir / SUBMISSION} and submission_soft.csv ({len(ids)} images)", flush=True)
    write_config(run_dir / KFOLD_SCORES, summary)
    return run_dir, summary


def parse_args(argv):
    """-> (kfold.py's flags, train.py's flags), checked before anything trains."""
    own, train_args = split_argv(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(own)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (train.py flags go after --)")
    check_train_args(train_args)
    if args.k < 2:
        raise UserError(f"--k {args.k}: need at least 2 folds")
    if args.batch_size <= 0:
        raise UserError("--batch_size must be positive")
    if args.eval_dir:
        check_dir(args.eval_dir, "eval dir")  # fail now, not after hours of training
    if args.reuse and train_args:
        raise UserError("--reuse trains nothing: drop the train.py flags after --")
    if args.resume and train_args:
        raise UserError(f"--resume takes the train.py flags from {Path(args.resume) / KFOLD}: drop those after --")
    if args.resume and args.reuse:
        raise UserError("--resume trains what is missing, --reuse trains nothing: give one")
    return args, train_args


def cli(argv=None):
    torch.set_num_threads(usable_cores())
    try:
        return run_main("kfold.py", main, argv, errors=(DataError,))
    except KeyboardInterrupt:
        print("kfold.py: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
