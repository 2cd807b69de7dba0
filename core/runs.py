"""What a run directory holds besides checkpoints: the next free run name, config.json, history.csv,
summary.json and the submission CSVs (pandas only, so the CSV tools stay light)."""
import csv
import json
import re
from pathlib import Path

from core.cli import UserError
from core.files import replace_atomically, replace_together
from core.labels import is_mask_scheme

# A train.py run directory's files, by the only names they have
BEST, LAST = "best.pth", "last.pth"          # checkpoints: the best epoch's, the last epoch's (what --resume takes)
CONFIG, HISTORY = "config.json", "history.csv"  # the resolved flags; one row per epoch
VAL_SOFT = "val_soft.csv"                    # the best epoch's validation probabilities (a fold's held-out part)
SUBMISSION, SUBMISSION_SOFT = "submission.csv", "submission_soft.csv"  # on the eval dir: answers, probabilities
TENSORBOARD = "tensorboard"                  # its event files
SUMMARY = "summary.json"  # written last, when a run ends well: its absence means the run did not finish
EPOCHS = "epochs"                            # --average_epochs: the best epochs' weights (epoch<n>.pth) until averaged

# A finalize run directory's own files (beside its finalists' fold runs)
FINALIZE_REPORT = "finalize.json"            # what was ranked, picked and voted: what export and the benchmarks read
REPORT = "report.md"                         # the same in words: finalists, selections, the vote (finalize prints it)
FOLDS_CONFIG = "folds.yml"                   # the NNI experiment that trains the finalists' folds
FOLD_EXPERIMENTS = "fold_experiments.txt"    # the ids of every fold experiment of that run dir: a rerun continues their folds
SOUP = "soup.pth"                            # --select soup: fold<i>/soup.pth, that fold's averaged model

# A kfold.py run directory's own files (beside its fold<i> runs)
KFOLD = "kfold.json"                         # k and the train.py flags every fold was given
OOF_SOFT = "oof_soft.csv"                    # the out-of-fold probabilities: every training image, once
KFOLD_SCORES = "kfold_scores.json"           # out-of-fold and per-fold scores, and the eval dir voted on


# An NNI trial's parameter that `imgcls-experiment --retry-failed` adds to a retry: {"trial": the id of the trial it retries,
# "parameter_id": that trial's, where the tuner (SafeTPE) takes the retry's result as theirs}; not a flag
RETRY_OF = "retry_of"


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
    """-> the summary dict of a finished run; UserError naming the run dir otherwise."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        raise UserError(f"{run_dir}: no {SUMMARY}, so the run did not finish (its log says why)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON") from None


def listed_files(folder):
    """The files a finished run's summary.json lists (train.py writes it last, naming every file of the run), or None
    where there is none (the run did not finish). UserError "not a valid summary" or "lists no files"."""
    path = Path(folder) / SUMMARY
    if not path.is_file():
        return None
    try:
        listed = json.loads(path.read_text()).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError("is not a valid summary") from None
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise UserError("lists no files")
    return listed


def incomplete(folder, names, may_be_empty=()):
    """Whether folder holds the named files of a run, whole -> "missing a, b; empty c", or "" when it does (a named
    directory need only be there; may_be_empty: files that can be)."""
    folder = Path(folder)
    missing = [n for n in names if not (folder / n).exists()]
    empty = [n for n in names if n not in may_be_empty and (folder / n).is_file() and (folder / n).stat().st_size == 0]
    return "; ".join(f"{kind} {', '.join(found)}" for kind, found in (("missing", missing), ("empty", empty)) if found)


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
    soft = pd.DataFrame(probs, columns=classes)
    soft.insert(0, "ImageID", image_ids)
    replace_together({out_dir / SUBMISSION: lambda tmp: pd.DataFrame({"ImageID": image_ids, "ans": answers}).to_csv(tmp, index=False),
                      out_dir / SUBMISSION_SOFT: lambda tmp: soft.to_csv(tmp, index=False, float_format="%.6f")})


def write_val_soft(path, image_ids, labels, probs, classes):
    """val_soft.csv: the best epoch's validation predictions, ImageID (path under the data dir), label and one
    probability column per class. A --kfold run's is its out-of-fold part: K of them cover the training set."""
    import pandas as pd
    table = pd.DataFrame(probs, columns=classes)
    table.insert(0, "label", labels)
    table.insert(0, "ImageID", image_ids)
    table.to_csv(path, index=False, float_format="%.6f")


# ----------------------------------------------------------------------------- a finalize run dir
def read_report(run_dir):
    """A finalize run dir's finalize.json -> the report dict; UserError when finalize has not finished a selection
    there (its folds may be home, but nothing was voted yet)."""
    path = run_dir / FINALIZE_REPORT
    if not path.is_file():
        raise UserError(f"{run_dir}: no {FINALIZE_REPORT}, so finalize has not finished a selection there "
                        f"(run imgcls-finalize to the end first)")
    try:
        report = json.loads(path.read_text())
    except ValueError:  # JSON and UTF-8 errors
        report = None
    if not isinstance(report, dict) or any(key not in report for key in ("select", "k", "winner", "greedy_weights")):
        raise UserError(f"{path}: damaged (not the report finalize wrote there): run imgcls-finalize again to rewrite it")
    return report


def voted_models(run_dir, report, select=None):
    """What a finalize selection soft-votes, model by model -> [(checkpoint path, weight)], weights summing to 1: the
    winner's K folds alike, the greedy ensemble's members' folds by their weights, or the K fold soups alike. select:
    the report's own by default (what its submission_soft.csv holds)."""
    select = select or report["select"]
    k = report["k"]
    if select == "soup":
        soup = report.get("soup")
        if soup is None:
            raise UserError(f"{run_dir}: finalize ran --select {report['select']} there, so it made no soups "
                            f"(run imgcls-finalize again with --select soup: it trains nothing new)")
        if "checkpoints" not in soup:
            raise UserError(f"{run_dir}: its soups were not saved (finalize from before export): run imgcls-finalize "
                            f"again with --select soup (it trains nothing new)")
        return [(run_dir / path, 1 / len(soup["checkpoints"])) for path in soup["checkpoints"]]
    chosen = {report["winner"]: 1.0} if select == "winner" else report["greedy_weights"]
    total = sum(chosen.values())
    return [(run_dir / name / f"fold{i}" / BEST, weight / total / k) for name, weight in chosen.items() for i in range(k)]
