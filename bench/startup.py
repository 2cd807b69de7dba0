"""Where a trial's time goes before it trains: train.py's start-up figures (summary.json) for BaseModel and a
fine-tuned EfficientNet-Lite0, run alternately, the cache built by the first run and warm after.

    python -m bench.startup                                   # this CPU: 2-epoch runs on a small drawn set
    python -m bench.startup --gpu                             # a GPU: --amp --channels_last on the device

Per model, the median over --repeats warm runs (and the one cold run) of the seconds from process start to:
the end of the imports, the data ready (decoded, cached, split), the model built and on the device (weights
loaded), the first optimiser step; then the first and second epochs, and lite0's first step minus BaseModel's
(the GPU goal: within 3 s with a warm cache; first epoch within 1.5x of the second). Not a test.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.searches import ROOT, data_flags, trial_time
from core import demo
from core.cli import Parser, UserError, run_main

MODELS = {"BaseModel": ["--model", "BaseModel", "--resize", "128", "96"],
          "lite0": ["--model", "timm/tf_efficientnet_lite0", "--pretrained", "--resize", "224", "224"]}
PHASES = ("imports_s", "data_s", "model_s", "first_step_s")


def build_parser():
    p = Parser(prog="startup.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="--device cuda --amp --channels_last")
    p.add_argument("--people", type=int, default=20, help="people in the drawn set (7 images each)")
    p.add_argument("--repeats", type=int, default=3, help="warm runs per model")
    p.add_argument("--resize", type=int, nargs=2, default=None, help="both models' input size (default: 128 96 and 224 224)")
    p.add_argument("--work", type=Path, default=None, help="where everything goes (default: a temp dir)")
    return p


def one_run(words, run_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *words, "--model_dir", str(run_dir.parent), "--name", run_dir.name],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise UserError(f"train.py failed: {proc.stderr.strip()[-500:]}")
    return trial_time(run_dir)  # 2 epochs: the later epoch is the second


def main(argv=None):
    cli = build_parser().parse_args(argv)
    work = (cli.work or Path(tempfile.mkdtemp(prefix="startup-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "train").is_dir():
        demo.make_demo_data(data, cli.people, max(cli.people // 4, 2), size=(192, 144), seed=37)
    common = [*data_flags(data), "--cache_dir", str(work / "cache"), "--epochs", "2", "--batch_size", "32"]
    if cli.gpu:
        common += ["--device", "cuda", "--amp", "--channels_last"]
    runs = {name: [] for name in MODELS}
    for repeat in range(cli.repeats + 1):  # the first of each builds its cache (cold)
        for name, words in MODELS.items():
            size = ["--resize", *map(str, cli.resize)] if cli.resize else []  # after the model's own: the last one wins
            runs[name].append(one_run([*words, *size, *common], work / "runs" / f"{name}_{repeat}"))
    result = {name: dict(cold=r[0], warm={k: statistics.median(x[k] for x in r[1:]) for k in r[0]}) for name, r in runs.items()}
    (work / "startup.json").write_text(json.dumps(dict(gpu=cli.gpu, runs=runs, result=result), indent=2))
    keys = [*PHASES, "first_epoch_s", "later_epoch_s", "wall_s"]
    print(f"\n| model | cache | {' | '.join(keys)} |\n|---|---|{'---|' * len(keys)}")
    for name, r in result.items():
        for cache in ("cold", "warm"):
            print(f"| {name} | {cache} | " + " | ".join(f"{r[cache][k]:.2f}" for k in keys) + " |")
    gap = result["lite0"]["warm"]["first_step_s"] - result["BaseModel"]["warm"]["first_step_s"]
    ratio = result["lite0"]["warm"]["first_epoch_s"] / result["lite0"]["warm"]["later_epoch_s"]
    print(f"\nlite0's first step - BaseModel's, warm: {gap:+.2f} s; lite0's first epoch / second: {ratio:.2f} (work dir {work})")


def cli(argv=None):
    return run_main("startup.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
