"""The data code's constants that the CSV-only tools and the flags share, without torch, numpy or PIL."""
import os
from pathlib import Path

# What a camera, a phone (set to "most compatible") or an export from another tool writes; docs/data.md lists them.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nni-image-classification"

FEEDS = ("auto", "device", "loader")
NO_CACHE_FOR_DEVICE = "--feed device needs the decoded-image cache: drop --no_cache"
