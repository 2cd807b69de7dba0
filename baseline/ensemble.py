"""Combine submissions: soft voting (mean of probabilities) or hard voting (majority of answers).

    python baseline/ensemble.py runs/exp/submission_soft.csv runs/exp2/submission_soft.csv --out runs/ensemble
    python baseline/ensemble.py runs/exp/submission_soft.csv runs/exp2/submission_soft.csv runs/exp3/submission_soft.csv --weights 2 1 1
    python baseline/ensemble.py --method hard runs/exp/submission.csv runs/exp2/submission.csv runs/exp3/submission.csv

soft  takes submission_soft.csv files (ImageID + one probability column per class),
      averages them (weighted by --weights) and writes submission.csv + submission_soft.csv.
hard  takes submission.csv files (ImageID,ans); every file votes its answer. A tie goes
      to the tied answer with the highest summed probability over the submission_soft.csv
      files found beside the inputs (<stem>_soft.csv), and without those to the answer
      of the earliest file listed among the tied ones: list your most trusted model first.
      Writes submission.csv only.
Inputs must list the same images (any order; the output keeps the first file's) and,
for probabilities, the same classes; each file is given once, and --out is not a folder
an input is in (it would be overwritten); otherwise nothing is written.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from core.cli import Parser, UserError, run_main
from core.runs import SUBMISSION, write_submission
from core.submissions import alignment, answer_column, read_hard, read_soft, soft_sibling


def align_soft(paths):
    """Several soft CSVs -> (image_ids, probs (M, N, C), classes), rows and columns in the first file's order."""
    ids, first, classes = read_soft(paths[0])
    stack = [first]
    for path in paths[1:]:
        other_ids, probs, other_classes = read_soft(path)
        if sorted(other_classes) != sorted(classes):
            extra, missing = sorted(set(other_classes) - set(classes)), sorted(set(classes) - set(other_classes))
            raise UserError(f"{path} and {paths[0]} have different classes: {len(other_classes)} vs {len(classes)}"
                            f"{f', only in {path}: ' + ', '.join(extra[:3]) if extra else ''}"
                            f"{f', only in {paths[0]}: ' + ', '.join(missing[:3]) if missing else ''}")
        rows = alignment(ids, other_ids, path, paths[0])
        columns = [other_classes.index(c) for c in classes]  # columns are named, so a reordering is harmless
        stack.append(probs[rows][:, columns])
    return ids, np.stack(stack), classes


def soft_vote(probs, weights=None):
    """(M, N, C) -> weighted mean (N, C)."""
    weights = np.ones(len(probs)) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.tensordot(weights / weights.sum(), probs, axes=1)


def hard_vote(votes, probs=None, classes=None):
    """votes (M, N) answers -> (N,) winners. Ties: the highest summed probability (probs (K, N, C),
    from the inputs that have soft CSVs), then the earliest voter among the tied answers."""
    winners, tied_images = [], 0
    for n in range(len(votes[0])):
        column = [v[n] for v in votes]
        counts = Counter(column)
        top = max(counts.values())
        tied = [a for a in counts if counts[a] == top]
        if len(tied) > 1:
            tied_images += 1
            if probs is not None:
                summed = probs[:, n].sum(0)
                mass = {a: (summed[c] if (c := answer_column(a, classes)) is not None else -np.inf) for a in tied}
                best = max(mass.values())
                tied = [a for a in tied if mass[a] == best]
            tied = [next(a for a in column if a in tied)]  # earliest voter wins what is left
        winners.append(tied[0])
    return winners, tied_images


def check_inputs(inputs, out):
    """Each file votes once, and the result overwrites none of them: refuse the same file given twice (by its
    resolved path: runs/a/../a/x.csv is runs/a/x.csv) and an --out that holds an input, where submission.csv and
    submission_soft.csv would replace that input or the files of its run."""
    seen = {}
    for path in inputs:
        real = Path(path).resolve()
        if real in seen:
            raise UserError(f"{seen[real]} and {path} are the same file: it would vote twice (to count a model more, "
                            f"soft voting takes --weights)")
        seen[real] = path
        if real.parent == Path(out).resolve():
            raise UserError(f"--out {out} holds the input {path}: the ensemble's submission files would overwrite it "
                            f"or its run's; write them elsewhere")


def build_parser():
    p = Parser(prog="ensemble.py", description="Soft or hard voting over submission CSVs -> one submission.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", help="soft: submission_soft.csv files; hard: submission.csv files")
    p.add_argument("--method", default="soft", choices=["soft", "hard"], help="mean of probabilities, or majority of answers")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="soft: one weight per input (default: equal)")
    p.add_argument("--out", default="runs/ensemble", help="where submission.csv (and submission_soft.csv for soft) go")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    check_inputs(args.inputs, out)
    if args.method == "soft":
        if args.weights is not None and (len(args.weights) != len(args.inputs) or min(args.weights) < 0 or sum(args.weights) <= 0):
            raise UserError(f"--weights: need {len(args.inputs)} non-negative numbers (one per input) with a positive sum, "
                            f"got {' '.join(map(str, args.weights))}")
        ids, probs, classes = align_soft(args.inputs)
        mean = soft_vote(probs, args.weights)
        out.mkdir(parents=True, exist_ok=True)
        write_submission(out, ids, mean, classes)
        weights = f", weights {' '.join(f'{w:g}' for w in args.weights)}" if args.weights else ""
        print(f"wrote {out / SUBMISSION} and submission_soft.csv: soft vote of {len(args.inputs)} files{weights}, "
              f"{len(ids)} images", flush=True)
        return

    if args.weights is not None:
        raise UserError("--weights applies to soft voting only")
    ids, first = read_hard(args.inputs[0])
    votes = [first]
    for path in args.inputs[1:]:
        other_ids, answers = read_hard(path)
        votes.append([answers[i] for i in alignment(ids, other_ids, path, args.inputs[0])])
    siblings = [s for s in map(soft_sibling, args.inputs) if s is not None]
    probs = classes = None
    if siblings:
        soft_ids, probs, classes = align_soft(siblings)
        probs = probs[:, alignment(ids, soft_ids, siblings[0], args.inputs[0])]
    winners, tied = hard_vote(votes, probs, classes)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"ImageID": ids, "ans": winners}).to_csv(out / SUBMISSION, index=False)
    how = f"probabilities from {len(siblings)} soft CSVs" if siblings else "the earliest file (no soft CSVs beside the inputs)"
    print(f"wrote {out / SUBMISSION}: hard vote of {len(args.inputs)} files, {len(ids)} images; "
          f"{tied} ties broken by {how}", flush=True)


def cli(argv=None):
    return run_main("ensemble.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
