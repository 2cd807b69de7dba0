"""What the flags need of the data code, light enough that parsing flags loads no torch, numpy or PIL
(training/flags.py imports this, never dataset.py). dataset.py checks that its registries match."""
import os
from pathlib import Path

# What a camera, a phone (set to "most compatible") or an export from another tool writes; docs/data.md lists them.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nni-image-classification"

FEEDS = ("auto", "device", "loader")
NO_CACHE_FOR_DEVICE = "--feed device needs the decoded-image cache: drop --no_cache"

# dataset.py's DATASETS and TRANSFORMS, by name (and each dataset's layout): a name added there goes here too.
DATASET_LAYOUTS = {
    "MaskSplitByProfileDataset": "mask",
    "MaskBaseDataset": "mask",
    "ImageFolderDataset": "folder",
}
TRANSFORM_NAMES = ("base", "flip", "flip_affine", "color_jitter", "gaussian_noise", "strong")
