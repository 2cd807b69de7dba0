"""Is the data path the bottleneck? Measures, side by side in one run, on the same data and model:

  (a) the bare model step (forward, backward, optimizer step) on preloaded tensors: the limit
  (b) train.py's end-to-end training images/s with the decoded-image cache (--feed auto)
  (c) the same with --no_cache (decode + resize every image every epoch)
  overhead: what train.py adds to each step over (a), in microseconds per batch
  --proxy: the host's share without a GPU, in this process: the training loop (training/engine.py) over each
      --feed's loader against the bare step, with a model so small (one linear layer) that the overhead dominates
  (d) trial start-up, process start to first step, with a warm cache, beside `python -c "import torch"`
  (e) peak memory of 1 and of 3 concurrent trials (RSS, and PSS, which splits shared pages
      such as the memory-mapped cache between the processes that map them)

    python bench/benchmark.py                                  # BaseModel and efficientnet_b0, demo data
    python bench/benchmark.py --models BaseModel --epochs 2
    python bench/benchmark.py --models efficientnet_b0 --resize 224 224 --device cuda --amp --channels_last
    python bench/benchmark.py --proxy --resize 32 24                            # the host overhead, microseconds per batch
    python bench/benchmark.py --models BaseModel --compile default reduce-overhead --skip_memory

--compile MODE...: (a) again under torch.compile in each mode (reduce-overhead = CUDA graphs on a GPU): the first
step's seconds (the compile), images/s after it, and the steps it takes to earn its compile time back, beside
a trial's --trial_steps.

Prints b/a and c/a. Not a test: numbers depend on the machine and its load.
"""
import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import dataset
from core import demo
from core.cli import Parser, run_main
from core.files import ROOT
from core.labels import DEFAULT_AGE_BOUNDS
from core.runs import HISTORY, read_summary
from imagedata.decode import load_images
from imagedata.layouts import read_mask_train
from model import create_model
from training.engine import train_one_epoch



def parse_args(argv=None):
    p = Parser(prog="benchmark.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["BaseModel", "efficientnet_b0"], help="models to measure")
    p.add_argument("--data_dir", default=None, help="mask-layout train dir (default: the demo data)")
    p.add_argument("--resize", nargs=2, type=int, default=[128, 96], metavar=("H", "W"), help="input size")
    p.add_argument("--batch_size", type=int, default=64, help="batch size")
    p.add_argument("--epochs", type=int, default=3, help="train.py epochs for (b) and (c); the first is warm-up")
    p.add_argument("--steps", type=int, default=20, help="timed steps for (a), at the least")
    p.add_argument("--timed_seconds", type=float, default=10.0,
                   help="time (a) and (b) over at least this long: on a GPU a demo epoch lasts about a second, too short "
                        "for a stable figure; (a) repeats its steps, (b) and (c) train more epochs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device")
    p.add_argument("--amp", action="store_true", help="pass --amp (CUDA)")
    p.add_argument("--channels_last", action="store_true", help="pass --channels_last (CUDA)")
    p.add_argument("--augmentation", default=None, help="train.py's --augmentation for (b) and (c) (default: train.py's)")
    p.add_argument("--compile", nargs="*", default=[], metavar="MODE", help="torch.compile modes to measure (a) under")
    p.add_argument("--trial_steps", type=int, default=1000, help="a trial's steps, for the compile verdict (train.py's --steps)")
    p.add_argument("--proxy", action="store_true", help="measure only the host overhead per batch of each feed (CPU)")
    p.add_argument("--skip_memory", action="store_true", help="skip (e)")
    p.add_argument("--skip_nocache", action="store_true", help="skip (c)")
    p.add_argument("--cudnn_benchmark", action="store_true",
                   help="(a) again with cuDNN autotuning (train.py's --cudnn_benchmark): its first step, and whether it pays")
    p.add_argument("--json", type=Path, default=None, help="also write the table's figures to this file")
    return p.parse_args(argv)


def bare_step(model_name, size, batch_size, steps, device, amp, channels_last, compile_mode=None, min_seconds=0.0, autotune=False):
    """(a): images/s of forward + backward + AdamW step on tensors already on the device, over `steps` steps or as
    many more as last min_seconds -> (images/s, seconds of the first step: with compile_mode, torch.compile's cost;
    with autotune, cuDNN's search), the seconds timed)."""
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = autotune
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(model_name, 18).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    x = torch.randn(batch_size, 3, *size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 18, (batch_size,), device=device)
    amp_dtype = torch.bfloat16 if amp and device == "cuda" else None
    forward = torch.compile(model, mode=compile_mode) if compile_mode else model

    def step():
        with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(n):
        start = time.perf_counter()
        for _ in range(n):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = timed(1)
    steps = max(steps, math.ceil(min_seconds / timed(2) * 2))  # two warm steps say how many fill min_seconds
    seconds = timed(steps)
    return steps * batch_size / seconds, first, seconds


def host_overhead(data_dir, cache_dir, size, batch_size, feed, epochs=5, repeats=5):
    """--proxy: microseconds per batch that train_one_epoch, fed by --feed feed, adds to the bare step of a one-layer
    model on a preloaded batch (both the median of `repeats` timings)."""
    device = torch.device("cpu")
    data = dataset.load_training_data(
        dataset="MaskSplitByProfileDataset", data_dir=data_dir, eval_dir=None, age_bounds=DEFAULT_AGE_BOUNDS, val_ratio=0.2, seed=0,
        kfold=0, fold=0, resize=size, augmentation="base", sampler="none", batch_size=batch_size, valid_batch_size=batch_size,
        num_workers=-1, cache_dir=cache_dir, use_cache=True, device=device, feed=feed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size[0] * size[1], 18))
    optimizer, criterion = torch.optim.AdamW(model.parameters(), lr=1e-4), torch.nn.CrossEntropyLoss()
    x, y = next(iter(data.train_loader))
    x = data.normalize(x)
    batches = len(data.train_loader)

    def bare():
        for _ in range(batches):
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def loop():
        train_one_epoch(model, data.train_loader, device=device, augment=None, normalize=data.normalize, criterion=criterion,
                        optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False), classification="single")

    def median_s(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(epochs):
                fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) / (epochs * batches)

    step, looped = median_s(bare), median_s(loop)
    return step * 1e6, (looped - step) * 1e6, data.feed


def compile_verdicts(cli, name, size, eager):
    """torch.compile's modes, and cuDNN autotuning with --cudnn_benchmark, against the eager step (a) -> printed lines,
    and {variant: (first step s, images/s, steps to break even)}."""
    out = {}
    variants = [(f"torch.compile mode={mode}", dict(compile_mode=mode)) for mode in cli.compile]
    variants += [("cudnn.benchmark", dict(autotune=True))] * cli.cudnn_benchmark
    for label, kw in variants:
        rate, first, _ = bare_step(name, size, cli.batch_size, cli.steps, cli.device, cli.amp, cli.channels_last,
                                   min_seconds=cli.timed_seconds / 2, **kw)
        saved = cli.batch_size / eager - cli.batch_size / rate  # seconds per step
        even = (first - cli.batch_size / eager) / saved if saved > 0 else float("inf")
        verdict = f"pays after {even:.0f} steps" if even < cli.trial_steps else f"does not pay within {cli.trial_steps} steps"
        print(f"{name} {label}: first step {first:.1f} s, then {rate:.1f} img/s = {rate / eager:.2f} x eager: {verdict}", flush=True)
        out[label] = dict(first_step_s=first, images_per_s=rate, ratio=rate / eager, break_even_steps=even if math.isfinite(even) else None)
    torch.backends.cudnn.benchmark = False
    return out


def train_cmd(cli, data_dir, model_name, cache_dir, run_dir, epochs, *extra):
    cmd = [sys.executable, str(ROOT / "train.py"), "--data_dir", str(data_dir), "--model", model_name,
           "--resize", *map(str, cli.resize), "--batch_size", str(cli.batch_size), "--epochs", str(epochs),
           "--cache_dir", str(cache_dir), "--model_dir", str(run_dir.parent), "--name", run_dir.name,
           "--device", cli.device, *extra]
    cmd += ["--augmentation", cli.augmentation] if cli.augmentation else []
    return cmd + ["--amp"] * cli.amp + ["--channels_last"] * cli.channels_last


def train_throughput(cmd, run_dir):
    """(b)/(c): median train images/s of train.py's epochs after the first (worker start-up, warm-up)
    -> (images/s, the run's summary)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"train.py failed:\n{proc.stderr[-2000:]}")
    with open(run_dir / HISTORY) as f:
        rates = [float(r["train_images_per_s"]) for r in csv.DictReader(f)]
    return statistics.median(rates[1:] or rates), read_summary(run_dir)


def process_tree(pid):
    """pid and its descendants (loader workers)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def memory_kib(pid, cache_dir):
    """(rss, pss, pss of the cache mapping) of one trial's process tree, KiB."""
    rss = pss = cache_pss = 0
    for p in process_tree(pid):
        try:
            lines = Path(f"/proc/{p}/smaps").read_text().splitlines()
        except OSError:
            continue
        in_cache = False
        for line in lines:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping's header line: address range ... path
                in_cache = str(cache_dir) in line
                continue
            if parts[0] == "Rss:":
                rss += int(parts[1])
            elif parts[0] == "Pss:":
                pss += int(parts[1])
                cache_pss += int(parts[1]) if in_cache else 0
    return rss, pss, cache_pss


def peak_memory(cmds, cache_dir):
    """(e): start the trials together; peak RSS per trial, peak summed PSS, peak summed PSS of the
    cache mapping (one copy if the trials share it, one per trial if they did not)."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in cmds]
    peak_rss, peak_pss, peak_cache = 0, 0, 0
    while any(p.poll() is None for p in procs):
        samples = [memory_kib(p.pid, cache_dir) for p in procs if p.poll() is None]
        peak_rss = max([peak_rss] + [s[0] for s in samples])
        peak_pss = max(peak_pss, sum(s[1] for s in samples))
        peak_cache = max(peak_cache, sum(s[2] for s in samples))
        time.sleep(0.2)
    if any(p.returncode for p in procs):
        sys.exit("a trial failed during the memory measurement")
    return peak_rss / 1024, peak_pss / 1024, peak_cache / 1024


def main(argv=None):
    cli = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    data_dir, _ = demo.data_dirs(cli.data_dir, None)
    work = Path(tempfile.mkdtemp(prefix="bench."))
    cache_dir = work / "cache"
    data = read_mask_train(data_dir)
    size = tuple(cli.resize)
    load_images(data["paths"], size, cache_dir)  # warm: (b) and (d) measure a warm cache
    cache_mib = len(data["paths"]) * size[0] * size[1] * 3 / 2**20
    print(f"{len(data['paths'])} images at {size[0]}x{size[1]} (cache {cache_mib:.0f} MiB), batch {cli.batch_size}, "
          f"device {cli.device}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}", flush=True)

    if cli.proxy:
        for feed in ("loader", "device"):
            step, overhead, used = host_overhead(data_dir, cache_dir, size, cli.batch_size, feed)
            print(f"proxy --feed {feed}: bare step {step:.0f} us, the training loop adds {overhead:.0f} us per batch ({used})")
        return

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    import_torch = time.perf_counter() - start

    rows = []
    for name in cli.models:
        a, _, a_seconds = bare_step(name, size, cli.batch_size, cli.steps, cli.device, cli.amp, cli.channels_last,
                                    min_seconds=cli.timed_seconds)
        train_images = round(len(data["paths"]) * (1 - 0.2))  # train.py's default --val_ratio
        epochs = max(cli.epochs, 1 + math.ceil(cli.timed_seconds * a / train_images))  # (b) <= (a): at least that long
        print(f"{name}: (a) timed over {a_seconds:.1f} s; (b) and (c) train {epochs} epochs, the first untimed, "
              f"at least {(epochs - 1) * train_images / a:.1f} s timed", flush=True)
        b, summary = train_throughput(train_cmd(cli, data_dir, name, cache_dir, work / f"{name}_cache", epochs), work / f"{name}_cache")
        c = float("nan") if cli.skip_nocache else train_throughput(
            train_cmd(cli, data_dir, name, cache_dir, work / f"{name}_nocache", epochs, "--no_cache"), work / f"{name}_nocache")[0]
        overhead = (cli.batch_size / b - cli.batch_size / a) * 1e6  # microseconds per batch
        print(f"{name}: (a) {a:.1f} img/s  (b) {b:.1f} img/s  (c) {c:.1f} img/s  b/a {b / a:.2f}  c/a {c / a:.2f}  "
              f"overhead {overhead:.0f} us/batch", flush=True)
        rows.append(dict(model=name, a=a, b=b, c=None if math.isnan(c) else c, b_over_a=b / a, overhead_us=overhead,
                         a_timed_s=a_seconds, b_epochs_timed=epochs - 1, first_step_s=summary["first_step_s"], feed=summary["feed"],
                         trial_wall_s=summary["wall_s"], variants=compile_verdicts(cli, name, size, a)))

    print("\nmodel            (a) bare step   (b) train.py   (c) no cache    b/a    c/a   overhead/batch  (d) first step  feed")
    for r in rows:
        c = float("nan") if r["c"] is None else r["c"]
        print(f"{r['model']:<16} {r['a']:>9.1f} img/s {r['b']:>9.1f} img/s {c:>9.1f} img/s  {r['b_over_a']:5.2f}  {c / r['a']:5.2f}  "
              f"{r['overhead_us']:>9.0f} us  {r['first_step_s']:9.1f} s      {r['feed']}")
    print(f"(d) python -c 'import torch': {import_torch:.1f} s")
    if cli.json:
        cli.json.write_text(json.dumps(dict(device=cli.device, resize=cli.resize, batch_size=cli.batch_size, amp=cli.amp,
                                            channels_last=cli.channels_last, import_torch_s=import_torch, rows=rows), indent=2))

    if not cli.skip_memory:
        one = [train_cmd(cli, data_dir, "BaseModel", cache_dir, work / "mem1", 1)]
        three = [train_cmd(cli, data_dir, "BaseModel", cache_dir, work / f"mem3_{i}", 1) for i in range(3)]
        rss1, pss1, cache1 = peak_memory(one, cache_dir)
        rss3, pss3, cache3 = peak_memory(three, cache_dir)
        print(f"(e) 1 trial : peak RSS {rss1:.0f} MiB, PSS {pss1:.0f} MiB, of which the image cache {cache1:.0f} MiB")
        print(f"(e) 3 trials: peak RSS {rss3:.0f} MiB per trial, summed PSS {pss3:.0f} MiB = {pss3 / pss1:.2f} x one trial, "
              f"of which the image cache {cache3:.0f} MiB = {cache3 / max(cache1, 1e-9):.2f} x one trial's")
    print(f"work dir {work}")


def cli(argv=None):
    return run_main("benchmark.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
