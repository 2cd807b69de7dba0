"""Do train.py's defaults fit the data? Real train.py runs, scored on each set's own eval split:

  convergence   two mask-layout sets drawn here, not the demo (another seed and image size; about 100
                and 1000 people): the default length (--steps) beside three times it
  levers        the demo data: the default run beside each imbalance lever and warmup + clipping

    python bench/defaults.py convergence        # its time on 2 cores: docs/defaults.md
    python bench/defaults.py levers
    python bench/defaults.py levers --only weighted_cross_entropy sampler
    python bench/defaults.py convergence --only large --seeds 1 2   # the pairs again with other training seeds

Prints one row per run: epochs, minutes, best validation accuracy / macro F1, eval macro F1.
Not a test: each figure is one run, on one machine.
"""
import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from core import demo
from core.cli import Parser, run_main
from core.files import ROOT
from core.runs import CONFIG, HISTORY, SUBMISSION, increment_path, read_summary
from core.scoring import evaluate


# (name, profiles, eval profiles, image size, seed): drawn unlike the demo (300 people, 128x96, seed 0)
SETS = [("small", 100, 100, (144, 108), 11), ("large", 1000, 150, (112, 84), 12)]
LEVERS = {
    "default": [],
    "weighted_cross_entropy": ["--criterion", "weighted_cross_entropy"],
    "sampler": ["--sampler", "weighted"],
    "focal": ["--criterion", "focal"],
    "f1": ["--criterion", "f1"],
    "label_smoothing": ["--criterion", "label_smoothing"],
    "age_bounds": ["--age_bounds", "30", "58"],
    "metric_f1": ["--metric", "f1"],
    "warmup_clip": ["--warmup_epochs", "3", "--clip_grad", "1.0"],
}


def parse_args(argv=None):
    p = Parser(prog="defaults.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("study", choices=["convergence", "levers"], help="which study")
    p.add_argument("--only", nargs="+", default=None,
                   help=f"levers (of {', '.join(LEVERS)}) or sets (of {', '.join(s[0] for s in SETS)}) to run")
    p.add_argument("--seeds", nargs="+", type=int, default=[42], help="convergence: train.py --seed of each pair")
    p.add_argument("--work", type=Path, default=None, help="where data and runs go (default: a temp dir)")
    return p.parse_args(argv)


def run(data, name, work, *flags):
    """One train.py run -> a result row."""
    t0 = time.time()
    run_dir = increment_path(work / "runs" / name)  # where train.py will put it: the same rule
    cmd = [sys.executable, str(ROOT / "train.py"), "--data_dir", str(data / "train"), "--eval_dir", str(data / "eval"),
           "--model_dir", str(run_dir.parent), "--name", run_dir.name, "--cache_dir", str(work / "cache"), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name}: train.py failed: {proc.stderr.strip().splitlines()[-1]}")
    summary = read_summary(run_dir)  # the run finished, there
    with open(run_dir / HISTORY, newline="") as f:
        history = list(csv.DictReader(f))
    config = json.loads((run_dir / CONFIG).read_text())
    best = max(history, key=lambda row: float(row[f"val_{config['metric']}"]))
    scores = evaluate(run_dir / SUBMISSION, data / "eval" / "truth.csv", "mask")["scores"]
    warned = summary["still_rising"]
    return dict(run=name, steps=config["steps"], epochs=len(history), minutes=(time.time() - t0) / 60, val_accuracy=float(best["val_accuracy"]),
                val_f1=float(best["val_f1"]), eval_accuracy=scores["accuracy"], eval_f1=scores["f1"], still_rising=warned)


def show(row):
    print(f"{row['run']:<28} {row['epochs']:>6} {row['minutes']:>7.1f} {row['val_accuracy']:>8.4f} {row['val_f1']:>7.4f} "
          f"{row['eval_accuracy']:>9.4f} {row['eval_f1']:>8.4f} {'yes' if row['still_rising'] else '':>6}", flush=True)


def main(argv=None):
    cli = parse_args(argv)
    work = cli.work or Path(tempfile.mkdtemp(prefix="defaults-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}\n{'run':<28} {'epochs':>6} {'minutes':>7} {'val acc':>8} {'val F1':>7} {'eval acc':>9} "
          f"{'eval F1':>8} {'rising':>6}", flush=True)
    if cli.study == "convergence":
        for name, profiles, eval_profiles, size, seed in (s for s in SETS if s[0] in (cli.only or [s[0]])):
            data = work / name
            if not data.is_dir():
                demo.make_demo_data(data, profiles, eval_profiles, size=size, seed=seed)
            for train_seed in cli.seeds:
                flags = ["--seed", str(train_seed)]
                default = run(data, f"{name}_default_seed{train_seed}", work, *flags)
                show(default)
                longer = run(data, f"{name}_3x_seed{train_seed}", work, *flags, "--steps", str(3 * default["steps"]))
                show(longer)
                print(f"{name} seed {train_seed}: eval macro F1 default - 3x = {default['eval_f1'] - longer['eval_f1']:+.4f}", flush=True)
    else:
        data = demo.ensure_demo_data()
        for lever in cli.only or LEVERS:
            show(run(data, lever, work, *LEVERS[lever]))


def cli(argv=None):
    return run_main("defaults.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
