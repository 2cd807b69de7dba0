"""Does finalize hand over a model that beats the defaults on people it never saw? Real searches and real
finalize runs, on the demo data and on mask-layout sets drawn unlike it.

    python bench/finalize.py                                   # demo seeds 1-3, then the drawn sets (hours on 2 cores)
    python bench/finalize.py --sets demo --seeds 1 --work /tmp/fin

For each (set, seed), at --resize 64 48 (as bench/hpo.py): config_local.yml's search (TPE + Medianstop
from the defaults, 12 trials of 20 epochs) with that seed, then search/finalize.py on it (top 3 + the
defaults, 5 folds, both --select modes), and scored on the set's eval split (macro F1):
  defaults          `python train.py` with its defaults, one run
  defaults_kfold    the defaults' own 5-fold vote (finalize's "defaults" finalist)
  search_best       the search's best trial (by its objective), its best.pth
  finalize_winner   finalize --select winner
  finalize_greedy   finalize --select greedy
and, over the finalists, the Spearman rank correlation of their out-of-fold macro F1 with their eval
F1 (their own 5-fold votes), beside the same for their single-split validation metric from the search.
Each (set, seed) lands in --work/results/ as JSON, so a rerun skips what is done (and finalize itself
trains no fold twice); the table is printed from all of them. Not a test.
"""
import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.searches import (ROOT, SETS, SIZE, data_flags, data_of, finalist_eval_f1, local_config, run_experiment, search_config,
                            soft_f1, train_run)
from core.cli import Parser, run_main
from core.scoring import evaluate
from core.runs import SUBMISSION, SUBMISSION_SOFT, read_report
from search.finalists import configuration
from search.trials import best_trial, from_id

METHODS = ["defaults", "defaults_kfold", "search_best", "finalize_winner", "finalize_greedy"]


def build_parser():
    p = Parser(prog="finalize.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS), help="data sets")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds on the demo (the drawn sets take the first)")
    p.add_argument("--port", type=int, default=8093, help="port of the experiments (one at a time)")
    p.add_argument("--work", type=Path, default=None, help="where everything goes (default: a temp dir)")
    return p


def spearman(a, b):
    if len(a) < 3:
        return None
    return float(np.corrcoef(pd.Series(a).rank(), pd.Series(b).rank())[0, 1])


def one(name, seed, work, cli):
    data = data_of(name, work)
    truth, flags = data / "eval" / "truth.csv", data_flags(data)
    base = local_config()
    config = search_config("tpe", seed, base, work)
    config.update(experimentName=f"fin-{name}-{seed}", assessor=base["assessor"], maxTrialNumber=base["maxTrialNumber"])
    config["trialCommand"] += " " + shlex.join(flags)
    out = work / "finalize" / f"{name}_{seed}"
    if (out / "plan.json").is_file():  # searched (and maybe finalized) before: finalize reuses what is home
        exp, minutes = from_id(json.loads((out / "plan.json").read_text())["experiment"]), None
    else:
        exp, _, minutes = run_experiment(config, cli.port, work)
        (work / f"search_{name}_{seed}.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    best = best_trial(exp)
    scores, report = {}, {}
    for select in ("winner", "greedy"):
        subprocess.run([sys.executable, str(ROOT / "search" / "finalize.py"), "--id", exp.id, "--config",
                        str(work / f"search_{name}_{seed}.yml"), "--select", select, "--out", str(out),
                        "--fold_port", str(cli.port + 1)], check=True, cwd=ROOT)
        scores[f"finalize_{select}"] = evaluate(out / SUBMISSION, truth, "mask")["scores"]["f1"]
        report = read_report(out)
    k = report["k"]
    finalists = report["finalists"]
    eval_f1 = {f["name"]: finalist_eval_f1(out, f["name"], k, truth) for f in finalists}
    command = config["trialCommand"]  # the defaults: the finalist that trains with the trial command's own flags
    defaults = next(f["name"] for f in finalists if configuration(command, f["params"]) == configuration(command, {}))
    scores["defaults_kfold"] = eval_f1[defaults]
    scores["search_best"] = soft_f1(Path(best.log_path) / SUBMISSION_SOFT, truth)
    words = [sys.executable, str(ROOT / "train.py"), *SIZE, "--seed", str(seed), "--cache_dir", str(work / "cache"), *flags]
    run_dir, _ = train_run(words, work / "defaults" / f"{name}_{seed}")
    scores["defaults"] = evaluate(run_dir / SUBMISSION, truth, "mask")["scores"]["f1"]
    searched = [f for f in finalists if f["search_metric"] is not None]
    return dict(set=name, seed=seed, search_minutes=minutes, experiment=exp.id, scores=scores, finalists=finalists,
                finalist_eval_f1=eval_f1, winner=report["winner"], greedy_weights=report["greedy_weights"],
                rank_oof=spearman([f["oof_f1"] for f in finalists], [eval_f1[f["name"]] for f in finalists]),
                rank_search=spearman([f["search_metric"] for f in searched], [eval_f1[f["name"]] for f in searched]))


def table(results):
    """The figures as a markdown table (docs/finalize.md holds it): mean ± sd over seeds per set."""
    print("\n| set | seeds | " + " | ".join(METHODS) + " | rank(oof, eval) | rank(val, eval) |")
    print("|---|---|" + "---|" * (len(METHODS) + 2))
    for name in SETS:
        rows = [r for r in results if r["set"] == name]
        if not rows:
            continue
        cells = []
        for m in METHODS:
            v = [r["scores"][m] for r in rows]
            cells.append(f"{np.mean(v):.3f}" + (f" ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else ""))
        ranks = [np.mean([r[key] for r in rows if r[key] is not None] or [np.nan]) for key in ("rank_oof", "rank_search")]
        print(f"| {name} | {len(rows)} | " + " | ".join(cells) + f" | {ranks[0]:.2f} | {ranks[1]:.2f} |")


def main(argv=None):
    cli = build_parser().parse_args(argv)
    work = cli.work or Path(tempfile.mkdtemp(prefix="finalize-bench-"))
    (work / "results").mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    for name in cli.sets:
        for seed in cli.seeds if name == "demo" else cli.seeds[:1]:
            done = work / "results" / f"{name}_{seed}.json"
            if not done.is_file():
                done.write_text(json.dumps(one(name, seed, work, cli), indent=2))
            print(f"{name} seed {seed}: {json.loads(done.read_text())['scores']}", flush=True)
    table([json.loads(p.read_text()) for p in sorted((work / "results").glob("*.json"))])


def cli(argv=None):
    return run_main("finalize.py", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
