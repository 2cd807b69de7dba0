"""The label scheme of the mask layout (18 classes = mask x gender x age band) and class ordering.

class = mask * 6 + gender * 3 + age_band; mask wear=0 (mask1-5), incorrect=1, not worn=2;
male=0, female=1; age band <LOW=0, LOW..HIGH-1=1, >=HIGH=2 (--age_bounds LOW HIGH). The data's own
labels, which every score is taken against, use DEFAULT_AGE_BOUNDS (<30, 30..59, >=60); another
--age_bounds changes only what a model trains on.
Pure Python: the CSV-only tools import it without numpy's or torch's start-up.
"""
import re

MASK_FILES = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
GENDERS = {"male": 0, "female": 1}
TASKS = ("mask", "gender", "age")
TASK_NAMES = (("wear", "incorrect", "not_worn"), ("male", "female"), ("young", "middle", "old"))
TASK_SIZES = tuple(len(names) for names in TASK_NAMES)  # (3, 2, 3): also the multi_head output sizes
NUM_MASK_CLASSES = TASK_SIZES[0] * TASK_SIZES[1] * TASK_SIZES[2]


def split_heads(logits):
    """multi_head logits (N, 8), a tensor -> mask (N, 3), gender (N, 2), age (N, 3): the model's and the loss's split."""
    return logits.split(TASK_SIZES, dim=1)


def encode_class(mask, gender, age_band):
    return mask * 6 + gender * 3 + age_band


def decode_class(label):
    """18-class index (int or array) -> (mask, gender, age_band)."""
    return label // 6, (label // 3) % 2, label % 3


DEFAULT_AGE_BOUNDS = (30, 60)


def age_band(age, age_bounds=DEFAULT_AGE_BOUNDS):
    return int(age >= age_bounds[0]) + int(age >= age_bounds[1])


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def formula_like(text):
    """A cell a spreadsheet would run as a formula (CSV injection): it starts with = + - @ or a tab/CR and is not
    a number. No class name or answer may be one: they are copied into the submission CSVs a user opens."""
    text = str(text)
    if not text.startswith(FORMULA_START):
        return False
    try:
        float(text)
        return False
    except ValueError:
        return True


def mask_class_names():
    masks, genders, ages = TASK_NAMES
    return [f"{m}_{g}_{a}" for m in masks for g in genders for a in ages]


def is_mask_scheme(classes):
    return list(classes) == mask_class_names()


def natural_key(text):
    """Sort key that puts "2" before "10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(text))]
