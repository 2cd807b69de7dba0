"""The main job on one GPU machine, end to end, in one command: does a config_gpu.yml search + finalize hand
over a better model than the pretrained defaults, and how much of a trial's time trains?

    python -m bench.gpu_workflow                          # one GPU machine: 7 to 12 minutes on an H200 (docs/gpu.md)
    python -m bench.gpu_workflow --seeds 2 --trials 4 --top 1 --k 2 --deadline 6     # a cut of it, under a deadline
    python -m bench.gpu_workflow --tiny                   # the same pipeline on the CPU in minutes
    python3 -m bench.gpu_session ...                      # how a lent GPU runs it: cut to the time left (docs/gpu.md)

On a mask-layout set drawn unlike the demo (another seed, size and number of people), scored on its eval
people (macro F1):
  defaults          config_gpu.yml's trial command run standalone, --seeds times side by side (mean ± sd)
  defaults_kfold    the same command's own K-fold vote (finalize's "defaults" finalist): the figure to beat
  search_best       the config_gpu.yml search's best trial (by its validation objective), its own eval prediction
  finalize_winner / finalize_greedy / finalize_soup   search/finalize.py on that search, --select each
The search is config_gpu.yml as shipped but shorter (--trials trials of --epochs epochs; the folds train as
many steps as those epochs hold). Trial efficiency: the time a trial spends in steady training (its epochs at
the median speed of all but the first) over its whole wall time; beside it where the rest went (summary.json's
start-up figures). Results: --results (default --work/results.json), rewritten as each step ends ("finished" names
them), and on a GPU bench/results/gpu_workflow/<gpu name>.json. --deadline stops the search and finalize's folds in
time (their experiments stopped) and keeps what finished. --tiny figures are a check that the pipeline runs, never
GPU figures. Not a test.
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

from bench.searches import DEADLINE_EXIT, ROOT, data_flags, finalist_eval_f1, run_experiment, soft_f1, train_run, trial_time
from core import demo
from core.cli import Parser, UserError, run_main
from core.runs import SUBMISSION, SUBMISSION_SOFT, read_report
from core.scoring import evaluate
from search import nni_io
from search.trials import best_trial
from training.engine import usable_cores
from weights import package_file

RESULTS = ROOT / "bench" / "results" / "gpu_workflow"
SELECTS = ("winner", "greedy", "soup")
# --tiny's defaults for the flags below: the pipeline in minutes on 2 CPU cores
TINY = dict(people=14, eval_people=7, size=[64, 48], resize=[64, 48], trials=2, epochs=1, top=2, k=2, seeds=2)


def build_parser():
    p = Parser(prog="gpu_workflow.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the same pipeline on the CPU, tiny: a check that it runs, not a figure")
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
    p.add_argument("--results", type=Path, default=None, help="the results file (default: --work/results.json)")
    p.add_argument("--deadline", type=float, default=None, help="minutes: the steps still running then stop, what finished is kept")
    return p


POSITIVE = ("people", "eval_people", "trials", "epochs", "top", "k", "seeds")


def search_config(cli, data, work, gpu):
    """config_gpu.yml as shipped, shortened, on the drawn set, trials run by this interpreter."""
    config = nni_io.load_config(cli.config)
    words = nni_io.train_words(config["trialCommand"])
    if "--epochs" not in words:
        raise UserError(f"{cli.config}: its trialCommand has no --epochs for the workflow to shorten")
    words = nni_io.with_flag(words, "--epochs", cli.epochs)
    steps = cli.epochs * -(-round(cli.people * 7 * (1 - 1 / cli.k)) // int(nni_io.flag_value(config["trialCommand"], "--batch_size")))
    command = shlex.join([sys.executable, str(ROOT / "train.py"), *words, *(["--resize", *map(str, cli.resize)] if cli.resize else []), "--steps", str(steps),
                          *data_flags(data), "--cache_dir", str(work / "cache")])
    config.update(experimentName="gpu-workflow", trialCommand=command, trialCodeDirectory=str(ROOT), maxTrialNumber=cli.trials,
                  maxExperimentDuration="1h", experimentWorkingDirectory=str(work / "nni"))
    config["tuner"] = dict(config["tuner"], codeDirectory=str(ROOT), classArgs=dict(config["tuner"]["classArgs"], trial_command=command))
    models = config["searchSpace"]["model"]["_value"]
    here = [m for m in models[:1 if cli.tiny else None] if package_file(m.removeprefix("timm/"))]
    if not here:
        raise UserError(f"{cli.config}: none of {', '.join(models)} has its weights package installed (bench/wheelhouse.txt)")
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
    words = [*shlex.split(command), "--threads", str(max(usable_cores() // parallel, 1))]  # side by side, not 3 x every core
    t0 = time.time()
    with ThreadPoolExecutor(parallel) as pool:
        runs = list(pool.map(lambda seed: train_run([*words, "--seed", str(seed)], work / "defaults" / f"seed{seed}")[0],
                             range(1, cli.seeds + 1)))
    truth = data / "eval" / "truth.csv"
    return [evaluate(r / SUBMISSION, truth, "mask")["scores"]["f1"] for r in runs], (time.time() - t0) / 60


def finalize(exp_id, config_path, out, cli, select, left_s):
    """search/finalize.py --select select -> minutes. The first trains the folds; the rest reuse them."""
    t0 = time.time()
    code = subprocess.run([sys.executable, "-m", "search.finalize", "--id", exp_id, "--config", str(config_path), "--select", select,
                           "--out", str(out), "--top", str(cli.top), "--k", str(cli.k), "--fold_port", str(cli.port + 1),
                           *(["--deadline", f"{max(left_s, 1) / 60:.2f}"] if left_s is not None else [])], cwd=ROOT).returncode
    if code and left_s is not None and left_s - (time.time() - t0) <= 0:
        raise TimeoutError(f"deadline {cli.deadline:g} min reached in finalize --select {select}")
    if code:
        raise UserError(f"finalize --select {select} failed (exit {code}); its lines are above")
    return (time.time() - t0) / 60


def drawn_set(cli, work):
    """The drawn set in work/data, made once; a work dir drawn with other values is refused, not silently reused."""
    data, wanted = work / "data", dict(people=cli.people, eval_people=cli.eval_people, size=list(cli.size), seed=cli.set_seed)
    made = data / "drawn.json"
    if (data / "train").is_dir():
        had = json.loads(made.read_text()) if made.is_file() else None
        if had != wanted:
            raise UserError(f"--work {work} holds a set drawn with {had or 'unknown values'}, not {wanted}: use another --work")
        return data
    demo.make_demo_data(data, cli.people, cli.eval_people, size=tuple(cli.size), seed=cli.set_seed)
    made.write_text(json.dumps(wanted))
    return data


def workflow(cli, work, gpu, save):
    """The steps in order, each result saved (save(result)) as it ends: a deadline or a failure keeps what finished."""
    until = time.monotonic() + cli.deadline * 60 if cli.deadline else None
    left = (lambda: until - time.monotonic()) if until else (lambda: None)
    data = drawn_set(cli, work)
    truth = data / "eval" / "truth.csv"
    config = search_config(cli, data, work, gpu)
    config_path = work / "search.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = dict(device=gpu or "cpu", tiny=cli.tiny, set=dict(people=cli.people, eval_people=cli.eval_people, size=cli.size,
                  seed=cli.set_seed), eval_f1={}, minutes={}, finished=[])

    def step(name):
        result["finished"].append(name)
        save(result)
        if until and left() <= 0:
            raise TimeoutError(f"deadline {cli.deadline:g} min reached after {name}")

    seeds_f1, result["minutes"]["defaults"] = defaults_runs(config["trialCommand"], cli, work, data, cli.seeds if gpu else 1)
    result["eval_f1"]["defaults"] = seeds_f1
    print(f"defaults, {cli.seeds} seeds: eval F1 {seeds_f1}", flush=True)
    step("defaults")

    exp, _, result["minutes"]["search"] = run_experiment(config, cli.port, work, stall_s=600, deadline_s=left())
    done = [t for t in exp.trials if t.status == "SUCCEEDED"]
    if not done:
        raise UserError(f"search {exp.id}: no trial succeeded; see {work / 'nni' / exp.id / 'trials'}")
    result["eval_f1"]["search_best"] = [soft_f1(Path(best_trial(exp).log_path) / SUBMISSION_SOFT, truth)]
    times = [trial_time(Path(t.log_path)) for t in done]
    result.update(search=dict(experiment=exp.id, trials=len(exp.trials), succeeded=len(done), epochs=cli.epochs), trials=times,
                  trial_time={key: statistics.median(t[key] for t in times) for key in times[0]})
    print(f"search {exp.id}: {len(done)}/{len(exp.trials)} trials succeeded, best's eval F1 {result['eval_f1']['search_best'][0]:.4f}",
          flush=True)
    step("search")

    out = work / "finalize"
    for select in SELECTS:
        result["minutes"][f"finalize_{select}"] = finalize(exp.id, config_path, out, cli, select, left())
        result["eval_f1"][f"finalize_{select}"] = [evaluate(out / SUBMISSION, truth, "mask")["scores"]["f1"]]
        if select == "winner":
            report = read_report(out)
            result["eval_f1"]["defaults_kfold"] = [finalist_eval_f1(out, "defaults", cli.k, truth)]
            result.update(finalists=report["finalists"], winner=report["winner"])
        elif select == "greedy":
            result["greedy_weights"] = read_report(out)["greedy_weights"]
        step(f"finalize_{select}")
    return result


def table(result):
    """The figures as markdown (docs/gpu.md holds the GPU run's)."""
    order = [r for r in ["defaults", "defaults_kfold", "search_best", *(f"finalize_{s}" for s in SELECTS)] if r in result["eval_f1"]]
    cost = dict(defaults="defaults", search_best="search", finalize_winner="finalize_winner", finalize_greedy="finalize_greedy",
                finalize_soup="finalize_soup")
    lines = [f"device {result['device']}{' (tiny: not a GPU figure)' if result['tiny'] else ''}", "",
             "| row | eval macro F1 | minutes |", "|---|---|---|"]
    for name in order:
        v = result["eval_f1"][name]
        spread = f" ± {statistics.stdev(v):.3f} ({len(v)} seeds)" if len(v) > 1 else ""
        spent = result["minutes"].get(cost.get(name, ""))
        lines.append(f"| {name} | {statistics.mean(v):.3f}{spread} | {'' if spent is None else f'{spent:.1f}'} |")
    finals = [result["eval_f1"][f"finalize_{s}"][0] for s in SELECTS if f"finalize_{s}" in result["eval_f1"]]
    if finals:
        lines += ["", f"best finalize - defaults_kfold: {max(finals) - result['eval_f1']['defaults_kfold'][0]:+.3f} (the gap that matters)"]
    if "trial_time" in result:
        lines.append("trial time, median over the search's trials: " + ", ".join(f"{k} {v:.2f}" for k, v in result["trial_time"].items()))
    lines.append(f"finished: {', '.join(result['finished']) or 'nothing'}")
    return "\n".join(lines)


def main(argv=None):
    parser = build_parser()
    cli = parser.parse_args(argv)
    if cli.tiny:  # its own defaults; flags given still win
        parser.set_defaults(**TINY)
        cli = parser.parse_args(argv)
    for name in POSITIVE:
        if getattr(cli, name) < 1:
            raise UserError(f"--{name} {getattr(cli, name)}: must be 1 or more")
    if cli.deadline is not None and cli.deadline <= 0:
        raise UserError(f"--deadline {cli.deadline:g}: must be above 0 minutes")
    import torch  # after the checks: a typo costs no torch import
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if not (gpu or cli.tiny):
        raise UserError("no CUDA GPU here: this measures the GPU workflow (--tiny runs its pipeline on the CPU)")
    work = (cli.work or Path(tempfile.mkdtemp(prefix="gpu-workflow-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = (cli.results or work / "results.json").resolve()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # children, uninstalled
    print(f"work dir {work}", flush=True)

    def save(result):
        tmp = results.with_name(f".{results.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(results)
        if gpu and not cli.tiny:
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{gpu.replace(' ', '_')}.json").write_text(json.dumps(result, indent=2))
    try:
        result = workflow(cli, work, gpu, save)
    except TimeoutError as e:  # what finished is in the results file; the exit code says it is not all
        print(f"{e}: the rest is not run", flush=True)
        print(table(json.loads(results.read_text()) if results.is_file() else dict(eval_f1={}, minutes={}, finished=[], device=gpu,
                                                                                    tiny=cli.tiny)), flush=True)
        sys.exit(DEADLINE_EXIT)
    print(table(result), flush=True)


def cli(argv=None):
    return run_main("gpu_workflow.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
