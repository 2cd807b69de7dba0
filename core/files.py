"""Safe file I/O: the one torch.load of a file someone hands us, atomic writes, and flag-file checks.

torch is imported only inside load_untrusted, so the CSV-only tools that use the rest start without it.
"""
import contextlib
import errno
import os
import pickle
import tempfile
from pathlib import Path

from core.cli import Resumable, UserError

ROOT = Path(__file__).resolve().parents[1]  # the checkout: train.py's folder, where NNI starts trials and the configs lie


def check_file(flag, path):
    """UserError naming the flag unless path is an existing file."""
    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: {'not a file' if Path(path).exists() else 'no such file'}")


def load_untrusted(path, what, device="cpu", mmap=False):
    """torch.load of a file someone handed us: tensors and plain values only (weights_only=True), so
    loading never runs code. Any failure is a UserError that starts with `what` (e.g. "--weights FILE")."""
    import torch

    if not Path(path).is_file():
        raise UserError(f"{what}: {'not a file' if Path(path).exists() else 'no such file'}")
    import zipfile
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        legacy = f.read(1) == b"\x80"  # torch's pre-1.6 format: pickles, the first its magic number
    if not (is_zip or legacy):  # read as a pickle, any other file fails as "weights only": blamed on Python objects
        raise UserError(f"{what}: not a PyTorch file (neither torch's zip format nor its legacy one)")
    try:  # mmap needs the zip format; a legacy file loads whole
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise UserError(f"{what}: refused: it holds Python objects other than tensors and plain values, "
                            f"and loading those could run code") from None
        raise UserError(f"{what}: not a PyTorch file (UnpicklingError)") from None
    except Exception as e:  # zip, EOF and torch errors: the file, not our code
        raise UserError(f"{what}: not a PyTorch file ({type(e).__name__})") from None


class DiskFull(Resumable):
    """A write that failed for want of space: the message names the file and the disk."""


def megabytes(n):
    return f"{n / 2**20:.1f} MB"


def mount_of(path):
    path = Path(path).resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def disk_space(path):
    """(free, total) bytes of the disk holding path, as an unprivileged writer sees them."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def replace_atomically(path, write):
    """write(tmp_path), then rename over path: a kill never leaves half a file, and a full disk
    leaves the old file, no temp file, and a UserError naming the file (a DiskFull naming the disk too)."""
    replace_together({path: write})


def replace_together(writes):
    """{path: write}: every write(tmp_path) first, then the renames, so the files change together or none does
    (a run's best.pth and last.pth, when the disk fills between them)."""
    temps = {Path(path): Path(path).with_name(f".{Path(path).name}.tmp") for path in writes}
    try:
        for path, write in writes.items():
            path = Path(path)
            try:
                write(temps[path])
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError, its errno lost
                raise write_error(path, e) from None
        for path, tmp in temps.items():
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise write_error(path, e) from None
    finally:
        for tmp in temps.values():
            if tmp.exists():
                # emptied first: that frees its space now, also while a writer still holds it open (torch.save's does
                # until its traceback is gone), so that the error line fits on a full disk (an NNI trial's stderr is there)
                with contextlib.suppress(OSError):
                    os.truncate(tmp, 0)
                tmp.unlink()


def write_error(path, e):
    """A failed write of path -> the UserError to raise: a DiskFull when the disk holding it is full."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
    free, total = disk_space(path.parent)  # the temp file still holds what it took: a full disk shows 0 here
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (not isinstance(e, OSError) and free < 2**20):
        return DiskFull(f"cannot write {path}: the disk is full ({mount_of(path.parent)}: {megabytes(free)} free of "
                        f"{megabytes(total)}; {reason})")
    return UserError(f"cannot write {path}: {reason}")


def check_output(what, path, folder=False):
    """UserError starting with `what` (e.g. "--out FILE") unless path, a file (or with folder, a folder), can be
    written: checked before the work whose result it holds, not after. Tried by making a file that has no name in
    the folder it goes to (or, before that exists, the nearest one above it), so nothing is left: os.access says yes
    to root on a read-only disk. Creates nothing."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{what}: {'a file, not a folder' if folder else 'a folder, not a file'}")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what}: cannot write there ({existing} is a file)")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UserError(f"{what}: cannot write there ({e.strerror or type(e).__name__})") from None


def read_mapping(path, what):
    """A JSON or YAML file (by suffix) holding a mapping -> dict; UserError naming `what` otherwise.
    YAML through safe_load: a file never builds Python objects."""
    check_file(what, path)
    path = Path(path)
    is_yaml = path.suffix in (".yml", ".yaml")
    try:
        text = path.read_text()
        if is_yaml:
            import yaml
            data = yaml.safe_load(text)
        else:
            import json
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError: the file, not our code
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{what} {path}: not valid {'YAML' if is_yaml else 'JSON'} ({reason})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a mapping of flag names to values")
    return data
