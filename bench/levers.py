"""Does a lever steady a fine-tune? The seed spread of one fine-tune (config_finetune.yml's command: lite0 from the
installed ImageNet weights) with each lever off and on, on the demo and two sets drawn unlike it.

    python -m bench.levers --levers none ema ema_warmup average_epochs layer_decay   # 5 seeds, 3 sets (over an hour on 2 cores)
    python -m bench.levers --levers none randaugment trivialaugment mixup cutmix     # the libraries' augmentations
    python -m bench.levers --seeds 1 2 --sets small --work /tmp/levers
    python -m bench.levers --epochs 10 --sets demo mid --levers none ema_warmup average_epochs   # a longer fine-tune
    python -m bench.levers --config config_gpu.yml --sets mid small     # on a GPU: lite0 at 224x224, 15 epochs

Levers: none (the command as is), --ema 0.99, --ema 0.999 --ema_warmup, --average_epochs 3, --layer_decay 0.85,
--augmentation randaugment or trivialaugment, --mixup 0.2, --cutmix 1.0.
Eval macro F1 of each run's own eval prediction; the table gives mean ± sd over seeds and minutes per run. Each
run's figures land in --work/results/ as JSON, so a rerun skips what is done. Not a test.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.searches import ROOT, data_flags, data_of, train_run
from core.cli import Parser, run_main
from core.runs import SUBMISSION
from core.scoring import evaluate
from search import nni_io

LEVERS = {"none": [], "ema": ["--ema", "0.99"], "ema_warmup": ["--ema", "0.999", "--ema_warmup"],
          "average_epochs": ["--average_epochs", "3"], "layer_decay": ["--layer_decay", "0.85"],
          # the libraries' augmentations (torchvision's), each at its usual strength
          "randaugment": ["--augmentation", "randaugment"], "trivialaugment": ["--augmentation", "trivialaugment"],
          "mixup": ["--mixup", "0.2"], "cutmix": ["--cutmix", "1.0"]}


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of epochs above 0")
    return int(text)


def build_parser():
    p = Parser(prog="levers.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["demo", "small", "mid"], choices=["demo", "small", "mid"], help="data sets")
    p.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS), help="levers")
    p.add_argument("--config", type=Path, default=ROOT / "config_finetune.yml", help="whose trialCommand is the fine-tune")
    p.add_argument("--epochs", type=positive, default=None, help="train this many epochs instead of the command's")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="seeds")
    p.add_argument("--work", type=Path, default=None, help="where everything goes (default: a temp dir)")
    return p


def one(config, name, lever, seed, epochs, work):
    data = data_of(name, work)
    command = nni_io.train_words(nni_io.load_config(config)["trialCommand"])
    words = [sys.executable, str(ROOT / "train.py"), *command, *LEVERS[lever], *(["--epochs", str(epochs)] if epochs else []),
             "--seed", str(seed), *data_flags(data), "--cache_dir", str(work / "cache")]
    start = time.time()
    run_dir, rows = train_run(words, work / "runs" / key(config, name, lever, seed, epochs))
    return dict(set=name, lever=lever, seed=seed, config=config.name, epochs=epochs, minutes=(time.time() - start) / 60, val_f1=[f1 for _, f1 in rows],
                eval_f1=evaluate(run_dir / SUBMISSION, data / "eval" / "truth.csv", "mask")["scores"]["f1"])


def key(config, name, lever, seed, epochs):
    """A run's name in --work: config_finetune's 3-epoch runs as the first study named them."""
    prefix = "" if config.name == "config_finetune.yml" else f"{config.stem}_"
    return f"{prefix}{name}_{lever}_{seed}" + (f"_{epochs}ep" if epochs else "")


def table(results, sets, levers):
    print("\n| set | " + " | ".join(levers) + " |\n|---|" + "---|" * len(levers))
    for name in sets:
        cells = []
        for lever in levers:
            rows = [r for r in results if r["set"] == name and r["lever"] == lever]
            f1 = [r["eval_f1"] for r in rows]
            cells.append(f"{statistics.mean(f1):.3f} ± {statistics.stdev(f1) if len(f1) > 1 else 0:.3f} "
                         f"({len(f1)}, {statistics.mean(r['minutes'] for r in rows):.1f} min)" if rows else "")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv=None):
    cli = build_parser().parse_args(argv)
    work = (cli.work or Path(tempfile.mkdtemp(prefix="levers-"))).resolve()
    (work / "results").mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    for seed in cli.seeds:  # seeds outermost: a stopped study still has every lever at its first seeds
        for name in cli.sets:
            for lever in cli.levers:
                done = work / "results" / f"{key(cli.config, name, lever, seed, cli.epochs)}.json"
                if not done.is_file():
                    done.write_text(json.dumps(one(cli.config, name, lever, seed, cli.epochs, work), indent=2))
                r = json.loads(done.read_text())
                print(f"{name} {lever} seed {seed}: eval F1 {r['eval_f1']:.4f} ({r['minutes']:.1f} min)", flush=True)
    results = [json.loads(p.read_text()) for p in sorted((work / "results").glob("*.json"))]
    table([r for r in results if r.get("epochs") == cli.epochs and r.get("config", "config_finetune.yml") == cli.config.name],
          cli.sets, cli.levers)


def cli(argv=None):
    return run_main("levers.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
