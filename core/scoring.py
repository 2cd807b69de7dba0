"""Scoring a submission against the truth: accuracy, macro F1, per task (mask, gender, age) for the 18-class
layout, and the confusion matrix. evaluation.py prints it; the benchmarks score with it. numpy and pandas only.

Both files are CSVs with ImageID,ans listing the same images. ans is a class index (mask layout) or a class
name (class-per-folder layout). A submission_soft.csv is scored by its most probable class. The class list
comes from the soft CSV (the submission itself or the <stem>_soft.csv beside it); without one, layout auto
takes class names, and refuses when every answer is an integer (mask indices or class folders named 1..10
cannot be told apart).
"""
import numpy as np

from core.cli import UserError
from core.labels import NUM_MASK_CLASSES, is_mask_scheme, mask_class_names, natural_key
from core.metrics import confusion, score
from core.submissions import alignment, answer_column, read_hard, read_soft, read_table, soft_columns, soft_sibling


def read_submission(path):
    """-> (image_ids, answers or None, probs or None, classes or None)."""
    table = read_table(path)
    if "ans" not in table.columns:
        ids, probs, classes = soft_columns(table, path)
        return ids, None, probs, classes
    ids, answers = table["ImageID"].tolist(), table["ans"].tolist()
    sibling = soft_sibling(path)
    classes = read_soft(sibling)[2] if sibling else None
    return ids, answers, None, classes


def class_list(truth_answers, answers, layout):
    """Classes when no soft CSV names them: --layout mask = the 18 mask classes by index, folder = the names seen.
    auto refuses to guess when every answer is an integer: class folders are often named 1, 2, ..., 10."""
    answers = truth_answers + answers
    if layout == "auto" and all(a.lstrip("-").isdigit() for a in truth_answers):
        raise UserError("every ans in the truth is an integer and no submission_soft.csv names the classes: "
                        "say --layout mask (indices of the 18 mask classes) or --layout folder (class names such as 1, 10)")
    if layout == "mask":
        bad = [a for a in answers if not (a.isdigit() and int(a) < NUM_MASK_CLASSES)]
        if bad:
            raise UserError(f"ans {bad[0]!r} is not a mask-layout class index 0..{NUM_MASK_CLASSES - 1} "
                            f"(class names need --layout folder)")
        return mask_class_names()
    return sorted(set(answers), key=natural_key)


def to_indices(answers, classes, ids, path):
    indices = [answer_column(a, classes) for a in answers]
    if None in indices:
        i = indices.index(None)
        raise UserError(f"{path}: ans {answers[i]!r} (image {ids[i]}) is neither a class name nor a class index "
                        f"of the {len(classes)} classes ({', '.join(classes[:4])}, ...)")
    return np.array(indices)


def evaluate(submission, truth, layout="auto"):
    """-> dict(scores, matrix, classes, images). Raises UserError on mismatched files."""
    ids, answers, probs, classes = read_submission(submission)
    truth_ids, truth_answers = read_hard(truth)
    rows = alignment(truth_ids, ids, submission, truth)
    if classes is None:
        classes = class_list(truth_answers, answers, layout)
    labels = to_indices(truth_answers, classes, truth_ids, truth)
    preds = probs.argmax(1)[rows] if probs is not None else to_indices(answers, classes, ids, submission)[rows]
    return dict(scores=score(labels, preds, len(classes), per_task=is_mask_scheme(classes)), matrix=confusion(labels, preds, len(classes)),
                classes=classes, images=len(labels))
