"""imagedata/decode.py: the one decoder (every mode, EXIF, centre crop) and the decoded-image cache
(built once and shared, rebuilt when damaged or stale, its temp files cleaned up after a kill)."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, train_env, write_image
from imagedata import decode
from imagedata.layouts import DataError


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    good = tmp_path / "good.jpg"
    write_image(good)
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DataError, match="bad.jpg"):
        decode.load_images([str(good), str(bad)], (32, 24), tmp_path / "cache")


def test_cache_built_once_shared_and_rebuilt_when_damaged_or_stale(tmp_path):
    paths = []
    for i in range(5):
        write_image(tmp_path / f"{i}.png", colour=(i * 40, 10, 200))
        paths.append(str(tmp_path / f"{i}.png"))
    cache = tmp_path / "cache"
    first = decode.load_images(paths, (16, 12), cache)
    expected = np.array(first)  # a copy: the truncation below reaches into the mapping
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and isinstance(first, np.memmap)
    assert first[3, 0, 0].tolist() == [120, 10, 200]
    mtime = files[0].stat().st_mtime_ns
    again = decode.load_images(paths, (16, 12), cache)
    assert files[0].stat().st_mtime_ns == mtime and np.array_equal(first, again)
    # damaged: truncated file is rebuilt, never trusted
    with open(files[0], "r+b") as f:
        f.truncate(files[0].stat().st_size - 10)
    rebuilt = decode.load_images(paths, (16, 12), cache)
    assert np.array_equal(rebuilt, expected)
    # stale: an image changed on disk gives a new key and new content
    write_image(tmp_path / "3.png", colour=(0, 255, 0))
    os.utime(tmp_path / "3.png", ns=(mtime + 10**9, mtime + 10**9))
    fresh = decode.load_images(paths, (16, 12), cache)
    assert fresh[3, 0, 0].tolist() == [0, 255, 0]
    assert decode.load_images(paths, (16, 12), cache, use_cache=False) is None


def test_decode_centre_crops_to_aspect(tmp_path):
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 25, 50))  # blue left quarter is cropped away for a square target
    img.save(tmp_path / "wide.png")
    out = decode.decode_image(tmp_path / "wide.png", (20, 20))
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert (out[:, :, 0] > 200).all()


def build_cache(args):
    paths, cache = args
    images = decode.load_images(paths, (16, 12), cache)
    return int(images.sum()), images.filename


@pytest.mark.slow
def test_trials_starting_together_share_one_cache(tmp_path):
    import multiprocessing

    paths = []
    for i in range(40):
        write_image(tmp_path / f"{i}.png", colour=(i * 6, 255 - i * 6, 7))
        paths.append(str(tmp_path / f"{i}.png"))
    cache = tmp_path / "cache"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(build_cache, [(paths, cache)] * 3)
    assert len({r[0] for r in results}) == 1 and len({r[1] for r in results}) == 1
    assert [p.suffix for p in cache.iterdir() if p.suffix != ".lock"] == [".npy"]
    assert results[0][0] == int(np.stack([decode.decode_image(p, (16, 12)) for p in paths]).sum())


def test_zero_byte_cache_file_is_rebuilt(tmp_path):
    paths = []
    for i in range(3):
        write_image(tmp_path / f"{i}.png", colour=(i * 60, 30, 90))
        paths.append(str(tmp_path / f"{i}.png"))
    first = np.array(decode.load_images(paths, (16, 12), tmp_path / "cache"))
    (cache_file,) = (tmp_path / "cache").glob("*.npy")
    cache_file.write_bytes(b"")
    assert np.array_equal(decode.load_images(paths, (16, 12), tmp_path / "cache"), first)


# ----------------------------------------------------------------------------- real photos and real folders (issue 21)
def channel_means(array):
    return array.reshape(-1, 3).mean(0)


def test_16_bit_png_keeps_its_grey(tmp_path):
    # mode I;16: convert("RGB") alone clipped every value over 255 to white
    grey = np.full((40, 30), 30000, dtype=np.uint16)
    grey[:, :15] = 5000
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    out = decode.decode_image(tmp_path / "grey16.png", (40, 30))
    assert out.shape == (40, 30, 3) and (out[:, :, 0] == out[:, :, 1]).all()
    assert abs(int(out[20, 5, 0]) - round(5000 / 257)) <= 1 and abs(int(out[20, 25, 0]) - round(30000 / 257)) <= 1


def test_exif_orientation_turns_a_phone_photo_upright(tmp_path):
    # stored landscape with the top of the scene at the left; Orientation 6 says: turn 90 degrees clockwise to view
    stored = Image.new("RGB", (80, 40), (200, 0, 0))
    stored.paste((0, 0, 200), (0, 0, 20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = decode.decode_image(tmp_path / "phone.jpg", (80, 40))  # (H, W): portrait, as the phone showed it
    top, bottom = channel_means(out[:10]), channel_means(out[-30:])
    assert top[2] > 150 and top[0] < 60 and bottom[0] > 150 and bottom[2] < 60


def test_every_mode_becomes_rgb_as_seen(tmp_path):
    rgb = (40, 160, 90)
    Image.new("RGB", (32, 32), rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    palette = Image.new("RGB", (32, 32), rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = palette.getpixel((0, 0))  # every pixel transparent: what shows is the background
    palette.save(tmp_path / "palette.png")
    Image.new("LA", (32, 32), (0, 0)).save(tmp_path / "grey_alpha.png")
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "rgba.webp", lossless=True)
    Image.new("RGB", (32, 32), rgb).save(tmp_path / "plain.tif")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK" and Image.open(tmp_path / "palette.png").mode == "P"
    assert np.abs(channel_means(decode.decode_image(tmp_path / "cmyk.jpg", (16, 16))) - rgb).max() < 6
    assert np.abs(channel_means(decode.decode_image(tmp_path / "plain.tif", (16, 16))) - rgb).max() < 1
    for transparent in ("palette.png", "grey_alpha.png", "rgba.webp"):  # was black: the colour stored under alpha 0
        assert (decode.decode_image(tmp_path / transparent, (16, 16)) == 255).all(), transparent


def test_stale_cache_temp_files_are_removed_and_live_ones_kept(tmp_path):
    import fcntl
    import time

    paths = []
    for i in range(3):
        write_image(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    cache = tmp_path / "cache"
    cache.mkdir()
    own_key, other_key, live_key = decode.cache_key(paths, (16, 12)), "0" * 20, "1" * 20
    stale = [cache / f"{own_key}.abc.npy.tmp", cache / f"{other_key}.def.npy.tmp", cache / "tmpold.npy.tmp"]
    for tmp in stale:
        tmp.write_bytes(b"\0" * 1024)
    (cache / f"{other_key}.lock").touch()  # a lock file nobody holds: its build died
    old = time.time() - 7200
    os.utime(cache / "tmpold.npy.tmp", (old, old))
    live = [cache / f"{live_key}.ghi.npy.tmp", cache / "tmpfresh.npy.tmp"]
    for tmp in live:
        tmp.write_bytes(b"\0")
    with open(cache / f"{live_key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build running now
        decode.load_images(paths, (16, 12), cache)
        assert not any(p.exists() for p in stale) and all(p.exists() for p in live)


CACHE_BUILDER = """
import sys, time
from imagedata.decode import load_images
paths = sys.argv[2:]
def slow(items):
    for i, item in enumerate(items):
        if i == 1:
            print("building", flush=True)
            time.sleep(60)
        yield item
load_images(paths, (16, 12), sys.argv[1], progress=slow)
"""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_cache_build_leaves_no_temp_file_behind(tmp_path, signum):
    paths = []
    for i in range(3):
        write_image(tmp_path / f"{i}.png", colour=(i * 50, 0, 0))
        paths.append(str(tmp_path / f"{i}.png"))
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", CACHE_BUILDER, str(cache), *paths], cwd=ROOT, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "building\n", proc.stderr.read()
    assert len(list(cache.glob("*.npy.tmp"))) == 1  # the build's own, full-size from the start
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    if signum == signal.SIGTERM:  # caught: the builder removes its own temp file, and the exit says which signal
        assert proc.returncode == 128 + signal.SIGTERM and err == "" and not list(cache.glob("*.npy.tmp"))
    else:  # not catchable: the next build removes it
        assert proc.returncode == -signal.SIGKILL and len(list(cache.glob("*.npy.tmp"))) == 1
    images = decode.load_images(paths, (16, 12), cache)
    assert images[2, 0, 0].tolist() == [100, 0, 0] and not list(cache.glob("*.npy.tmp"))


def test_a_cache_from_the_old_decoder_is_not_read(tmp_path, monkeypatch):
    # the key once held only the paths, their stat and the size: a cache of sideways photos would have been kept
    write_image(tmp_path / "a.png")
    paths = [str(tmp_path / "a.png")]
    key = decode.cache_key(paths, (16, 12))
    monkeypatch.setattr(decode, "DECODER_VERSION", decode.DECODER_VERSION - 1)
    assert decode.cache_key(paths, (16, 12)) != key
