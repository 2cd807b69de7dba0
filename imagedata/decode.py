"""The one image decoder, and the decoded-image cache.

Images are decoded, centre-cropped and resized once into a uint8 array (N, H, W, 3). With the cache on
(the default) that array is a memory-mapped .npy file shared by every trial on the machine: one trial
builds it under a lock while the others wait, into a temp file whose disk space is reserved first.
"""
import fcntl
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from core.cli import make_progress
from core.signals import signals_raise
from imagedata.constants import DEFAULT_CACHE_DIR
from imagedata.layouts import DataError


BACKGROUND = (255, 255, 255, 255)  # under transparent pixels, as an image viewer or a web page shows them
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow opens 16-bit greyscale PNG and TIFF as one of these


def to_rgb(img):
    """Any mode Pillow opens -> RGB as a person sees it. convert("RGB") alone clips 16-bit greys (0..65535) to
    white, and drops transparency, showing whatever colour the transparent pixels happen to store."""
    if img.mode in SIXTEEN_BIT:
        grey = np.clip(np.asarray(img, dtype=np.float32) / 257, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.has_transparency_data:  # RGBA, LA, PA, and P or L or RGB with a transparent colour
        return Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND), img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")  # CMYK (Pillow undoes Adobe's inverted CMYK when it reads one), P, L, 1, YCbCr


def decode_image(path, size):
    """The one decoder (training, validation, eval, inference, the cache): file -> uint8 (H, W, 3), turned upright
    by its EXIF orientation (phone photos are stored sideways), every mode to RGB, centre-cropped to the
    target aspect ratio, then resized. Animated GIFs and multi-page TIFFs give their first frame."""
    try:
        with Image.open(path) as img:
            img = to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {e}") from None
    h, w = size
    scale = min(img.width / w, img.height / h)
    cw, ch = round(w * scale), round(h * scale)
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    img = img.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    return np.asarray(img, dtype=np.uint8)


DECODER_VERSION = 2  # in the cache key: a cache decoded otherwise (1: EXIF ignored, 16-bit clipped) is never read


def cache_key(paths, size):
    digest = hashlib.sha1(f"{size[0]}x{size[1]} decoder {DECODER_VERSION}".encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"\0{p}\0{st.st_mtime_ns}\0{st.st_size}".encode())
    return digest.hexdigest()[:20]


def _valid_cache(path, shape):
    """The cache file if it is whole, else None (missing, empty, truncated or of another shape: rebuild it)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    if array.shape != shape or array.dtype != np.uint8:
        return None
    expected = array.offset + array.nbytes
    return array if os.path.getsize(path) == expected else None


def load_images(paths, size, cache_dir=DEFAULT_CACHE_DIR, use_cache=True, progress=None):
    """Decoded images as uint8 (N, H, W, 3): a shared memory-mapped cache file,
    or, with use_cache=False, None (the dataset then decodes on the fly)."""
    if not use_cache:
        return None
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(unwritable_cache(cache_dir, e)) from None
    key = cache_key(paths, size)
    target, shape = cache_dir / f"{key}.npy", (len(paths), size[0], size[1], 3)
    array = _valid_cache(target, shape)
    if array is not None:  # read only: a cache built earlier serves from a read-only dir too
        return array
    try:
        lock = open(cache_dir / f"{key}.lock", "w")
    except OSError as e:
        raise DataError(unwritable_cache(cache_dir, e)) from None
    # Trials that start together: one builds while the others wait on the lock.
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_stale_temps(cache_dir, key)
        array = _valid_cache(target, shape)
        if array is None:
            build_cache(target, paths, size, shape, progress)
            array = _valid_cache(target, shape)
    return array


def unwritable_cache(cache_dir, error):
    return (f"--cache_dir {cache_dir}: cannot write there ({error.strerror or type(error).__name__}); "
            f"pass another --cache_dir, or --no_cache")


def remove_stale_temps(cache_dir, held_key, legacy_age_s=3600):
    """Delete the temp files of builds that died without cleaning up (kill -9, a power cut): each could be as big
    as a whole cache. A build holds its key's lock for as long as its temp file ({key}.*.npy.tmp) exists, so a
    temp file whose lock is free, or is ours (held_key), is stale. Temp files named before keys were (tmp*.npy.tmp)
    have no lock to ask: stale once an hour has passed without a write."""
    for tmp in cache_dir.glob("*.npy.tmp"):
        key = tmp.name.split(".")[0]
        try:
            if key.startswith("tmp"):
                stale = time.time() - tmp.stat().st_mtime > legacy_age_s
            else:
                stale = key == held_key or not is_locked(cache_dir / f"{key}.lock")
            if stale:
                tmp.unlink()
        except FileNotFoundError:  # its build has just renamed it into place
            pass


def is_locked(lock_path):
    """Whether a live process holds this flock ("a", not "w": opening it leaves a live build's lock file as it is)."""
    if not lock_path.exists():
        return False
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True


def build_cache(target, paths, size, shape, progress=None):
    """Decode every image into a temp .npy next to target, then rename it into place. The file's blocks
    are reserved first: writing a memory map on a full disk would die of SIGBUS, with no message.
    The temp file goes on any exit Python sees; remove_stale_temps takes those of killed builds."""
    with signals_raise():
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{target.stem}.", suffix=".npy.tmp")
        try:
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                os.posix_fallocate(fd, 0, out.offset + out.nbytes)
            except OSError as e:
                raise DataError(f"cannot build the image cache in {target.parent}: {e.strerror} (it needs "
                                f"{np.prod(shape) / 2**20:.1f} MiB; free some space, or pass --cache_dir elsewhere or --no_cache)") from None
            for i, p in enumerate(progress(paths) if progress else paths):
                out[i] = decode_image(p, size)
            out.flush()
            del out
            os.replace(tmp, target)
        finally:
            os.close(fd)
            if os.path.exists(tmp):
                os.remove(tmp)


def decode_all(paths, size, cache_dir=DEFAULT_CACHE_DIR, use_cache=True, desc="decoding images"):
    """Decode every image now, so that an unreadable one stops a run before it starts, not after training:
    into the cache, where the images are then read from, or, without one, once, to check them."""
    if use_cache:
        return load_images(paths, size, cache_dir, True, make_progress(desc))
    progress = make_progress(desc) or (lambda it: it)
    for path in progress(paths):
        decode_image(path, size)
    return None


def mean_std(images, paths, size, limit=2000):
    """Per-channel mean/std in [0, 1] over up to `limit` evenly spaced images, every 4th
    pixel each way: plenty for the statistics, and it keeps trial start-up short."""
    picks = np.linspace(0, len(paths) - 1, min(limit if images is not None else 200, len(paths))).astype(int)
    sample = images[picks] if images is not None else np.stack([decode_image(paths[i], size) for i in picks])
    pixels = sample[:, ::4, ::4].reshape(-1, 3).astype(np.float32) / 255
    return pixels.mean(0, dtype=np.float64).tolist(), np.maximum(pixels.std(0, dtype=np.float64), 1e-3).tolist()
