"""Reading submission CSVs: submission.csv (ImageID,ans), submission_soft.csv (ImageID + one probability column
per class) and val_soft.csv (ImageID, label + the same columns). pandas only, so the CSV tools stay light.

A probability column is named by its class, and a class index means a position in the model's own class list,
so every reader puts the columns in that order by name: the 18 mask classes in the scheme's order, else natural
order (how a class-per-folder model numbers its folders). A file in another column order then scores and votes
the same, and a missing or unknown class is refused instead of shifting every column by one.
"""
from pathlib import Path

import numpy as np

from core.cli import UserError
from core.labels import formula_like, mask_class_names, natural_key

ROW_SUM_TOLERANCE = 1e-3  # what rounding to 6 decimals leaves over 1000 classes


def read_table(path):
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")  # Excel's "CSV UTF-8" starts with a BOM
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable CSV ({reason})") from None
    if "ImageID" not in table.columns:
        raise UserError(f"{path}: no ImageID column")
    if table.empty:
        raise UserError(f"{path}: lists no image")
    duplicated = table["ImageID"][table["ImageID"].duplicated()]
    if len(duplicated):
        raise UserError(f"{path}: ImageID {duplicated.iloc[0]} is listed more than once")
    return table


def class_order(columns, path):
    """Probability columns -> the classes in the model's order; UserError naming the file for a mask-layout file
    with a class missing or a column that is no mask class."""
    formula = [c for c in columns if formula_like(c)]
    if formula:  # it would reach submission.csv's answers, and run when a spreadsheet opens the file
        raise UserError(f"{path}: column {formula[0]!r} is no class name (it starts as a spreadsheet formula)")
    mask = mask_class_names()
    if not any(c in mask for c in columns):
        return sorted(columns, key=natural_key)
    missing, unknown = [c for c in mask if c not in columns], [c for c in columns if c not in mask]
    if missing or unknown:
        raise UserError(f"{path}: its probability columns are not the 18 mask classes: "
                        + "; ".join(f"{what} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                                     for what, names in (("missing", missing), ("unknown", unknown)) if names))
    return mask


def read_soft(path):
    """submission_soft.csv -> (image_ids, probs (N, C) float64, classes), columns in the model's class order."""
    return soft_columns(read_table(path), path)


def read_val_soft(path):
    """val_soft.csv -> (image_ids, labels (N,) int, probs (N, C), classes)."""
    table = read_table(path)
    ids, probs, classes = soft_columns(table, path, extra=("label",))
    if not table["label"].str.fullmatch(r"\d+").all():
        raise UserError(f"{path}: its label column holds something other than class indices")
    return ids, table["label"].astype(int).to_numpy(), probs, classes


def soft_columns(table, path, extra=()):
    """A soft CSV's table -> (image_ids, probs (N, C) float64, classes) in the model's class order.
    extra: non-class columns the file carries (val_soft.csv's label)."""
    import pandas as pd
    missing = [c for c in extra if c not in table.columns]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} column")
    columns = [c for c in table.columns if c != "ImageID" and c not in extra]
    if not columns or columns == ["ans"]:
        raise UserError(f"{path}: no class probability columns (a submission.csv?); soft voting needs submission_soft.csv files")
    if len(columns) == 1:  # a classifier has two classes or more: this is a submission.csv with a misnamed column
        raise UserError(f"{path}: columns ImageID,{columns[0]}: expected ImageID,ans (submission.csv) "
                        f"or ImageID and one probability column per class (submission_soft.csv)")
    classes = class_order(columns, path)
    probs = table[classes].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~(np.isfinite(probs) & (probs >= 0) & (probs <= 1 + 1e-6))  # logits or scores here would vote with the wrong weight
    if bad.any():
        row, col = np.argwhere(bad)[0]
        value, image = table[classes[col]].iloc[row], table["ImageID"].iloc[row]
        raise UserError(f"{path}: {value!r} in column {classes[col]} (image {image}) is not a probability")
    off = np.abs(probs.sum(1) - 1) > ROW_SUM_TOLERANCE  # all zeros, all ones, scores: not one image's probabilities
    if off.any():
        row = int(np.argmax(off))
        raise UserError(f"{path}: the probabilities of image {table['ImageID'].iloc[row]} sum to {probs[row].sum():.4g}, "
                        f"not 1 ({int(off.sum())} of {len(probs)} rows)")
    return table["ImageID"].tolist(), probs, classes


def read_hard(path):
    """submission.csv -> (image_ids, answers as strings: class index or class name)."""
    table = read_table(path)
    if "ans" not in table.columns:
        raise UserError(f"{path}: no ans column (a submission_soft.csv?); hard voting needs submission.csv files")
    formula = table["ans"][table["ans"].map(formula_like)]
    if len(formula):
        raise UserError(f"{path}: answer {formula.iloc[0]!r} is no class (it starts as a spreadsheet formula)")
    return table["ImageID"].tolist(), table["ans"].tolist()


def alignment(reference_ids, ids, path, reference_path):
    """Row order that puts `ids` in the reference order; refuses a different set of images."""
    position = {image_id: i for i, image_id in enumerate(ids)}
    if len(ids) != len(reference_ids) or any(i not in position for i in reference_ids):
        only_here = sorted(set(ids) - set(reference_ids))
        only_there = sorted(set(reference_ids) - set(ids))
        example = (f"{len(only_here)} not in {reference_path} (e.g. {only_here[0]})" if only_here
                   else f"{len(only_there)} of {reference_path} missing (e.g. {only_there[0]})")
        raise UserError(f"{path} and {reference_path} list different images: {example}")
    return np.array([position[i] for i in reference_ids])


def answer_column(answer, classes):
    """An ans value -> its probability column: by class name, else by class index (the mask layout's
    submission.csv), else None. With class names like "2" or "10" an index would be ambiguous: names only."""
    if answer in classes:
        return classes.index(answer)
    if answer.isdigit() and int(answer) < len(classes) and not any(str(c).isdigit() for c in classes):
        return int(answer)
    return None


def soft_sibling(path):
    """submission.csv -> the submission_soft.csv beside it, or None."""
    path = Path(path)
    sibling = path.with_name(f"{path.stem}_soft{path.suffix}")
    return sibling if sibling.is_file() else None
