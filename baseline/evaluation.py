"""Score a submission against the truth: accuracy, macro F1, per task (mask, gender, age) for
the 18-class layout, and the confusion matrix.

    python baseline/evaluation.py runs/inference/submission.csv --truth data/demo/eval/truth.csv
    python baseline/evaluation.py runs/exp/submission_soft.csv --truth data/demo/eval/truth.csv --plot runs/confusion.png
    python baseline/evaluation.py flowers_pred/submission.csv --truth flowers_truth.csv --layout folder

Both files are CSVs with ImageID,ans and must list the same images. ans is a class
index (mask layout) or a class name (class-per-folder layout). A submission_soft.csv
is scored by its most probable class. The class list comes from the soft CSV (the
submission itself or the <stem>_soft.csv beside it); without one, --layout auto
takes class names, and asks for --layout when every answer is an integer (mask indices
or class folders named 1..10 cannot be told apart).
"""
import argparse
import sys
from pathlib import Path

import pandas as pd

from core.cli import Parser, UserError, run_main
from core.figures import confusion_image
from core.labels import TASKS
from core.scoring import evaluate


def report(result):
    scores = result["scores"]
    rows = [("all", scores["accuracy"], scores["f1"])]
    rows += [(task, scores[f"{task}_accuracy"], scores[f"{task}_f1"]) for task in TASKS if f"{task}_f1" in scores]
    lines = [f"{result['images']} images, {len(result['classes'])} classes", f"{'':8}{'accuracy':>10}{'macro F1':>10}"]
    lines += [f"{name:8}{acc:>10.4f}{f1:>10.4f}" for name, acc, f1 in rows]
    # columns by index keep an 18-class matrix readable in a terminal; the row labels name them
    matrix = pd.DataFrame(result["matrix"], index=[f"{i:>2} {c}" for i, c in enumerate(result["classes"])],
                          columns=[str(i) for i in range(len(result["classes"]))])
    lines += ["", "confusion matrix (rows = truth, columns = predicted class index):", matrix.to_string()]
    return "\n".join(lines)


def save_plot(result, path, title):
    image = confusion_image(result["matrix"], result["classes"], title=title)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    except (OSError, ValueError) as e:  # no permission, no such dir, a suffix PIL cannot write
        raise UserError(f"--plot {path}: cannot write it ({getattr(e, 'strerror', None) or e})") from None


def build_parser():
    p = Parser(prog="evaluation.py", description="Score a submission against a truth CSV (ImageID,ans).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("submission", help="submission.csv (ImageID,ans) or submission_soft.csv")
    p.add_argument("--truth", required=True, help="CSV with ImageID,ans (the demo data writes eval/truth.csv)")
    p.add_argument("--layout", default="auto", choices=["auto", "mask", "folder"],
                   help="how to read ans when no soft CSV names the classes: mask = 18-class indices, folder = class names, "
                        "auto = names, refusing all-integer answers")
    p.add_argument("--plot", default=None, help="also save the confusion matrix as a picture (e.g. confusion.png)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    result = evaluate(args.submission, args.truth, args.layout)
    if args.plot:  # first: a plot that cannot be written is the one line the user sees
        save_plot(result, args.plot, f"{Path(args.submission).name}: macro F1 {result['scores']['f1']:.4f}")
    print(report(result), flush=True)
    if args.plot:
        print(f"saved {args.plot}", flush=True)
    return result


def cli(argv=None):
    return run_main("evaluation.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
