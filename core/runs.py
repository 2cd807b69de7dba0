"""What a run directory holds besides checkpoints: the next free run name, history.csv,
config.json and the submission CSVs (pandas only, so the CSV tools stay light)."""
import csv
import json
import os
import re
from pathlib import Path

from core.labels import is_mask_scheme


def increment_path(path):
    """runs/exp -> runs/exp if free, else runs/exp2, runs/exp3, ..."""
    path = Path(path)
    if not path.exists():
        return path
    taken = [int(m.group(1) or 1) for p in path.parent.glob(f"{path.name}*")
             if (m := re.fullmatch(re.escape(path.name) + r"(\d*)", p.name))]
    return path.with_name(f"{path.name}{max(taken) + 1}")


def replace_atomically(path, write):
    """write(tmp_path), then rename over path: a kill never leaves half a file, and a full disk
    leaves the old file, no temp file, and a ValueError naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
        raise ValueError(f"cannot write {path}: {reason}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_config(path, config):
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


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
