"""What an exported file buys at prediction time: images/s of the .onnx under onnxruntime against its checkpoint in
PyTorch (as inference.py runs it: uint8 in, normalised, class probabilities out), side by side in one run, at
batch 1 (a service answering one photo) and 64 (a folder).

    python bench/export.py                                        # BaseModel 128x96, tf_efficientnet_lite0 224x224
    python bench/export.py --models BaseModel:128x96 --batches 1 8 64 --out /tmp/export.json

Not a test: numbers depend on the machine and its load (the load average is recorded beside them). Weights do not
change the speed, so the models are untrained and nothing is downloaded.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

import model
from core.cli import Parser, UserError, run_main
from core.labels import mask_class_names
from imagedata.augment import Normalize
from training import checkpoint, onnxfile
from training.engine import class_probs


def parse_args(argv=None):
    p = Parser(prog="export.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["BaseModel:128x96", "timm/tf_efficientnet_lite0:224x224"],
                   help="model:HxW, each measured at every batch size")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64], help="batch sizes")
    p.add_argument("--seconds", type=float, default=4.0, help="timed seconds per measurement (after a warm-up)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    return p.parse_args(argv)


def images_per_s(run, batch, seconds):
    """Repeats run() until `seconds` have passed (at least 3 times, after 2 warm-up calls) -> images/s."""
    for _ in range(2):
        run()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        run()
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def measure(name, size, batches, seconds, folder):
    """One model: its checkpoint in PyTorch and its exported file in onnxruntime, at each batch size -> rows."""
    meta = dict(format=checkpoint.FORMAT_VERSION, model=name, classification="single", head="", dropout=0.0,
                classes=mask_class_names(), layout="mask", resize=list(size), mean=[0.5] * 3, std=[0.25] * 3, metric="accuracy", args={})
    torch.manual_seed(0)
    path = folder / f"{name.replace('/', '_')}.pth"
    checkpoint.save(path, model.create_model(name, 18, resize=size), meta, epoch=1, best_metric=0.0)
    onnxfile.export([(path, 1.0)], path.with_suffix(".onnx"), log=lambda line: None)
    net, ckpt = checkpoint.load_model(path)
    normalize = Normalize(ckpt["mean"], ckpt["std"])
    session = onnxfile.session(path.with_suffix(".onnx"), torch.device("cpu"))
    rows = []
    for batch in batches:
        x = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8)
        feed = {"image": x.numpy()}

        def in_torch():
            with torch.no_grad():
                class_probs(net, normalize(x), "single")
        torch_rate = images_per_s(in_torch, batch, seconds)
        onnx_rate = images_per_s(lambda: session.run(["probs"], feed), batch, seconds)
        rows.append(dict(model=name, size=list(size), batch=batch, pytorch_images_per_s=round(torch_rate, 1),
                         onnxruntime_images_per_s=round(onnx_rate, 1), ratio=round(onnx_rate / torch_rate, 2)))
        print(f"{name} {size[0]}x{size[1]} batch {batch}: PyTorch {torch_rate:.0f} images/s, onnxruntime {onnx_rate:.0f} "
              f"images/s, x{onnx_rate / torch_rate:.1f}", flush=True)
    return rows


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv=None):
    args = parse_args(argv)
    specs = []
    for spec in args.models:
        name, _, size = spec.rpartition(":")
        try:
            specs.append((name, tuple(int(v) for v in size.split("x"))))
        except ValueError:
            raise UserError(f"--models {spec}: expected model:HxW, e.g. BaseModel:128x96") from None
    torch.set_num_threads(os.cpu_count() or 1)
    load = os.getloadavg()[0]
    if load > 1.2:  # another process on the cores: the two runtimes would not be measured alike
        print(f"warning: load average {load:.2f} before the run: another job shares the CPU", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for name, size in specs for row in measure(name, size, args.batches, args.seconds, Path(tmp))]
    after = os.getloadavg()[0]
    if after > max(load, 1.0) + 1.0:  # the run's own two threads bring it near 2; more means company
        print(f"warning: load average rose to {after:.2f} during the run: another job shared the CPU, run again",
              file=sys.stderr, flush=True)
    result = dict(machine=f"{cpu_name()}, {os.cpu_count()} cores", load_before=round(load, 2), load_after=round(after, 2),
                  versions=dict(torch=torch.__version__, onnxruntime=onnxruntime.__version__, numpy=np.__version__), rows=rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}", flush=True)
    return result


def cli(argv=None):
    return run_main("export.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
