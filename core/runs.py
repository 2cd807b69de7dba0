"""What a run directory holds besides checkpoints: the next free run name, config.json, history.csv,
summary.json and the submission CSVs (pandas only, so the CSV tools stay light)."""
import csv
import json
import re
from pathlib import Path

from core.files import replace_atomically
from core.labels import is_mask_scheme

SUMMARY = "summary.json"  # written last, when a run ends well: its absence means the run did not finish


def increment_path(path):
    """runs/exp -> runs/exp if free, else runs/exp2, runs/exp3, ... The name is literal: as a glob, 'exp[1]'
    would match exp1, never itself."""
    path = Path(path)
    if not path.exists():
        return path
    taken = [int(m.group(1) or 1) for p in path.parent.iterdir() if (m := re.fullmatch(re.escape(path.name) + r"(\d*)", p.name))]
    return path.with_name(f"{path.name}{max(taken) + 1}")


def write_config(path, config):
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


def write_summary(run_dir, summary):
    """The run's machine-readable summary: what tools read instead of its printed lines."""
    write_config(Path(run_dir) / SUMMARY, summary)


def read_summary(run_dir):
    """-> the summary dict of a finished run; ValueError naming the run dir otherwise."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {SUMMARY}, so the run did not finish (its log says why)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: not valid JSON") from None


def write_history(path, history):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    replace_atomically(path, write)


def write_submission(out_dir, image_ids, probs, classes):
    """submission.csv (ImageID,ans: class index for the mask scheme, class name otherwise)
    and submission_soft.csv (ImageID + one probability column per class, named by class)."""
    import pandas as pd
    out_dir = Path(out_dir)
    preds = probs.argmax(1)
    answers = preds if is_mask_scheme(classes) else [classes[i] for i in preds]
    pd.DataFrame({"ImageID": image_ids, "ans": answers}).to_csv(out_dir / "submission.csv", index=False)
    soft = pd.DataFrame(probs, columns=classes)
    soft.insert(0, "ImageID", image_ids)
    soft.to_csv(out_dir / "submission_soft.csv", index=False, float_format="%.6f")


def write_val_soft(path, image_ids, labels, probs, classes):
    """val_soft.csv: the best epoch's validation predictions, ImageID (path under the data dir), label and one
    probability column per class. A --kfold run's is its out-of-fold part: K of them cover the training set."""
    import pandas as pd
    table = pd.DataFrame(probs, columns=classes)
    table.insert(0, "label", labels)
    table.insert(0, "ImageID", image_ids)
    table.to_csv(path, index=False, float_format="%.6f")
