"""core/files.py: writes that replace files together or not at all, and a full disk named as such, on a real small
tmpfs (mounted as root, as tests/test_train.py's full-disk runs do)."""
import pytest

from conftest import tmpfs
from core.cli import UserError
from core.files import DiskFull, disk_space, mount_of, replace_atomically, replace_together


@pytest.fixture
def tiny_disk(tmp_path):
    with tmpfs(tmp_path / "disk", "size=256k") as path:
        yield path


def test_files_replaced_together_or_not_at_all_when_the_disk_fills_between_them(tiny_disk):
    a, b = tiny_disk / "best.pth", tiny_disk / "last.pth"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    with pytest.raises(DiskFull) as e:
        replace_together({a: lambda tmp: tmp.write_bytes(b"new a"), b: lambda tmp: tmp.write_bytes(b"\0" * 1024 * 1024)})
    assert (a.read_bytes(), b.read_bytes()) == (b"old a", b"old b") and sorted(p.name for p in tiny_disk.iterdir()) == ["best.pth", "last.pth"]
    assert str(e.value) == f"cannot write {b}: the disk is full ({tiny_disk}: 0.0 MB free of 0.2 MB; No space left on device)"
    assert disk_space(tiny_disk)[0] > 200 * 1024  # what the failed write took, given back
    replace_together({a: lambda tmp: tmp.write_bytes(b"new a"), b: lambda tmp: tmp.write_bytes(b"new b")})
    assert (a.read_bytes(), b.read_bytes()) == (b"new a", b"new b")


def test_a_write_that_fails_for_another_reason_is_no_full_disk(tmp_path):
    def refuse(tmp):
        raise PermissionError(13, "Permission denied")
    (tmp_path / "f").write_text("kept")
    with pytest.raises(UserError) as e:
        replace_atomically(tmp_path / "f", refuse)
    assert type(e.value) is UserError and str(e.value) == f"cannot write {tmp_path / 'f'}: Permission denied"
    assert (tmp_path / "f").read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_the_disk_is_its_mount_point(tiny_disk, tmp_path):
    assert mount_of(tiny_disk / "not" / "yet") == tiny_disk and mount_of(tmp_path) != tiny_disk
