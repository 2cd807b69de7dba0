"""The data registries a user edits, and what training reads:
  DATASETS    name -> (layout, reader, split); create_dataset, and read_split, the one train/validation split;
              CSV_FLAGS, the flags a CsvDataset reads its CSV with
  TRANSFORMS  name -> training augmentations; create_transform
  load_training_data  read, split, decode, choose the feed -> TrainingData (the loaders and the facts a run records)

The code behind them is in imagedata/ (layouts, split, decode and the cache, augment, feed). Images are
decoded, centre-cropped and resized once into a uint8 array (N, H, W, 3). With the cache on (the default)
that array is a memory-mapped .npy file shared by every trial on the machine; augmentations then work on
uint8 tensors and normalisation happens on the device, in the training loop. The label scheme lives in
core/labels.py, the demo data in core/demo.py.

    python dataset.py --demo data/demo --profiles 300   # write the demo data set
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from core import demo
from core.cli import UserError, make_progress
from core.labels import DEFAULT_AGE_BOUNDS
from imagedata.augment import (ColorJitter, GaussianNoise, Normalize, RandomAffine, RandomFlip, create_mix, load_pipeline,
                               rand_augment, trivial_augment)
from imagedata.decode import decode_all, load_images, mean_std
from imagedata.feed import PER_IMAGE, ImageDataset, choose_feed, make_loaders
from imagedata.layouts import DataError, read_csv_train, read_eval, read_folder_train, read_mask_train
from imagedata.split import split_by_columns, split_by_profile, split_random

# name -> (layout, reader, splitter): the --dataset choices
DATASETS = {
    "MaskSplitByProfileDataset": ("mask", read_mask_train, split_by_profile),
    "MaskBaseDataset": ("mask", read_mask_train, split_random),
    "ImageFolderDataset": ("folder", read_folder_train, split_random),
    "CsvDataset": ("folder", read_csv_train, split_by_columns),  # a model of class names, as a folder data set's
}
# The flags that say where a CsvDataset's CSV and columns are (train.py's --labels_csv ...): its reader's arguments
CSV_FLAGS = ("labels_csv", "image_column", "label_column", "group_column", "fold_column")


def csv_options(flags):
    """The CSV flags set in a run's flags (a dict: vars(args), or a checkpoint's saved ones)."""
    return {k: flags[k] for k in CSV_FLAGS if flags.get(k)}


def create_dataset(name, data_dir, age_bounds=DEFAULT_AGE_BOUNDS, options=None):
    """-> (layout, data dict, splitter). options: a CsvDataset's csv_options."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    layout, reader, splitter = DATASETS[name]
    return layout, reader(data_dir, age_bounds, **(options or {})), splitter


def read_split(name, data_dir, age_bounds, val_ratio, seed, kfold=0, fold=0, options=None):
    """The one train/validation split: train.py trains on it, and kfold.py scores each fold's model on
    its held-out part by calling it with the flags the checkpoint saved.
    -> (layout, data dict, train indices, validation indices)."""
    layout, data, splitter = create_dataset(name, data_dir, tuple(age_bounds), options)
    train_idx, val_idx = splitter(data, val_ratio, seed, kfold, fold)
    for side, indices in (("validation", val_idx), ("training", train_idx)):
        if not len(indices):  # a few people per stratum round to none at a small --val_ratio
            raise DataError(f"the split leaves no {side} images ({len(data['paths'])} images, --val_ratio {val_ratio}"
                            f"{f', --kfold {kfold}' if kfold else ''}): change --val_ratio, or use --kfold K")
    return layout, data, train_idx, val_idx


# Every name includes the base transform: centre crop + resize happen at decode time
# (so the cache holds them), normalisation with the data's mean/std on the device. The --augmentation choices.
# randaugment and trivialaugment are torchvision's, drawn per image (PerImage): a loop over the batch, not one call.
TRANSFORMS = {
    "base": lambda **_: [],
    "flip": lambda **_: [RandomFlip()],
    "flip_affine": lambda **_: [RandomAffine(flip=True)],
    "color_jitter": lambda **_: [RandomFlip(), ColorJitter()],
    "gaussian_noise": lambda **_: [RandomFlip(), GaussianNoise()],
    "strong": lambda **_: [RandomAffine(flip=True), ColorJitter(), GaussianNoise()],
    "randaugment": lambda magnitude, **_: [RandomFlip(), rand_augment(magnitude)],
    "trivialaugment": lambda **_: [RandomFlip(), trivial_augment()],
}


def create_transform(name, magnitude=9):
    """-> a module on float NCHW batches in [0, 255], or None for no augmentation. magnitude: RandAugment's, 0..30."""
    if name not in TRANSFORMS:
        raise UserError(f"unknown augmentation {name!r}; valid: {', '.join(TRANSFORMS)}")
    steps = TRANSFORMS[name](magnitude=magnitude)
    return torch.nn.Sequential(*steps) if steps else None



@dataclass
class TrainingData:
    """What training reads: the split's loaders, and the facts the checkpoint and the run record."""
    layout: str                  # "mask", or "folder": class names (a folder or a CSV data set)
    classes: list                # class names, index order
    class_counts: np.ndarray     # training images per class
    drawn_counts: np.ndarray     # what an epoch draws of each class in expectation: class_counts, or equal shares of the
                                 # present classes under --sampler weighted (what weighted_cross_entropy weighs)
    resize: tuple                # (H, W) after the centre crop: --resize
    mean: list                   # per-channel statistics of the training images, in [0, 1]
    std: list
    workers: int                 # loader workers actually used (0 with the device feed)
    feed: str                    # "device" or "loader" (choose_feed)
    feed_note: str               # the line that says which and why
    generators: list             # loader order, weighted draws: their state goes into last.pth
    normalize: torch.nn.Module   # on the device
    augment: torch.nn.Module     # on the device; None for no augmentation
    mix: object                  # --mixup / --cutmix: (batch, labels) -> (mixed batch, soft targets), else None
    train_loader: object         # a DataLoader, or DeviceBatches / Prefetched over one
    val_set: "ImageDataset"
    val_loader: object
    val_ids: list                # the validation images' paths relative to the data dir, val_set's order
    val_truth: np.ndarray        # their labels in the data's own scheme: what validation is scored on
    eval_ids: list = None        # with an eval dir: its image ids and paths
    eval_paths: list = None
    infer_batch: int = None      # every validation and eval batch is this long, a short one padded: one shape on a GPU


def load_training_data(*, dataset, data_dir, eval_dir, age_bounds, val_ratio, seed, kfold, fold, resize, augmentation,
                       sampler, batch_size, valid_batch_size, num_workers, cache_dir, use_cache, device, split_seed=None,
                       feed="auto", stats=None, options=None, magnitude=9, mixup=0.0, cutmix=0.0, albumentations=None):
    """Read, split and decode the data (the demo data when no data_dir) -> TrainingData. Every check that
    can fail on the inputs (layout, images, the eval dir and its images) runs here, before a run dir exists.
    split_seed: seeds the train/validation split instead of seed (None: seed). feed: see choose_feed. stats: the
    (mean, std) to normalise with (model.input_config's, for ImageNet weights), else the data's own. options: see read_split.
    magnitude: --randaugment_magnitude; mixup, cutmix: their alphas (0: off); albumentations: a pipeline file, run per
    image in the loader (the device feed off)."""
    if data_dir is None and DATASETS[dataset][0] != "mask":
        raise UserError(f"--dataset {dataset} needs --data_dir (the demo data is in the mask layout)")
    data_dir, eval_dir = demo.data_dirs(data_dir, eval_dir)
    layout, data, train_idx, val_idx = read_split(dataset, data_dir, age_bounds, val_ratio, seed if split_seed is None else split_seed,
                                                  kfold, fold, options)
    size = tuple(resize)
    pipeline = load_pipeline(albumentations, size, seed) if albumentations else None
    eval_ids, eval_paths = read_eval(eval_dir, layout, f"--dataset {dataset}") if eval_dir else (None, None)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    feed, feed_note = choose_feed(PER_IMAGE if pipeline and feed == "auto" else feed,
                                  None if not use_cache else len(data["paths"]) * size[0] * size[1] * 3, device, free)
    images = load_images(data["paths"], size, cache_dir, use_cache, make_progress("decoding images"))
    if eval_dir:  # predicting them comes after training: an unreadable one must stop the run now, not then
        decode_all(eval_paths, size, cache_dir, use_cache, "decoding eval images")
    mean, std = (list(stats[0]), list(stats[1])) if stats else mean_std(images, data["paths"], size)
    train_set = ImageDataset(data["paths"], size, images, data["labels"], train_idx, transform=pipeline)
    val_set = ImageDataset(data["paths"], size, images, data["labels"], val_idx)
    generators = [torch.Generator().manual_seed(seed) for _ in range(2)]
    counts = np.bincount(data["labels"][train_idx], minlength=len(data["classes"]))
    draws, drawn = None, counts
    if sampler == "weighted":  # every present class drawn alike
        draws = WeightedRandomSampler(1.0 / counts[data["labels"][train_idx]], len(train_idx), generator=generators[1])
        drawn = np.where(counts > 0, len(train_idx) / np.count_nonzero(counts), 0.0)
    train_loader, val_loader, workers = make_loaders(
        train_set, val_set, images=images, labels=data["labels"], sampler=draws, generators=generators, batch_size=batch_size,
        valid_batch_size=valid_batch_size, num_workers=num_workers, feed=feed, device=device)
    return TrainingData(layout=layout, classes=data["classes"], class_counts=counts, drawn_counts=drawn, resize=size, mean=mean, std=std,
                        workers=workers, feed=feed, feed_note=feed_note, generators=generators,
                        normalize=Normalize(mean, std).to(device), augment=create_transform(augmentation, magnitude),
                        mix=create_mix(mixup, cutmix, len(data["classes"])),
                        train_loader=train_loader, val_set=val_set, val_loader=val_loader, eval_ids=eval_ids, eval_paths=eval_paths,
                        val_ids=[Path(data["paths"][i]).relative_to(data_dir).as_posix() for i in val_idx],
                        val_truth=data["truth"][val_idx], infer_batch=min(valid_batch_size, max(len(val_idx), len(eval_paths or ()))))


if __name__ == "__main__":  # the documented way to write the demo data by hand
    demo.main()
