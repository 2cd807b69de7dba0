"""finalize's ranking and vote: every finalist scored out of fold on the same images and labels, the winner (or a
greedy ensemble of all) soft-voted on the eval dir, and the report of what was picked and why."""
import json
import math
from dataclasses import asdict

import numpy as np

from core.cli import UserError
from core.files import replace_atomically
from core.folds import join_folds
from core.metrics import score
from core.runs import CONFIG, FINALIZE_REPORT, REPORT, SUBMISSION_SOFT, SUMMARY, VAL_SOFT, read_summary, write_submission
from core.submissions import alignment, read_soft, read_val_soft
from search.finalists import differences, ran_configuration
from search.trials import flag_words


def fold_files(folder, finalist):
    """A fold at home -> (its summary, val_soft.csv, submission_soft.csv), each checked: present, readable, and
    trained with the finalist's planned command (a fold of another command is never voted)."""
    for name in (SUMMARY, CONFIG, VAL_SOFT, SUBMISSION_SOFT):
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: missing (delete {folder} and run finalize again to retrain that fold)")
    ran = ran_configuration(folder)
    if finalist.config is not None and ran != finalist.config:
        raise UserError(f"{folder}: trained with another command than {finalist.name}'s plan ({differences(finalist.config, ran)}); "
                        f"delete it and run again, or use another --out")
    return read_summary(folder), read_val_soft(folder / VAL_SOFT), read_soft(folder / SUBMISSION_SOFT)


def finalist_scores(run_dir, finalist, k):
    """-> dict(oof probs (sorted ImageID order), labels, ids, classes, fold F1s, eval ids, eval probs (mean of the folds)).
    The K held-out parts must cover the training images exactly once: a short val_soft.csv would score fewer."""
    parts, evals, fold_f1 = [], [], []
    for fold in range(k):
        folder = run_dir / finalist.name / f"fold{fold}"
        summary, (ids, labels, probs, classes), (eval_ids, eval_probs, eval_classes) = fold_files(folder, finalist)
        if len(ids) != summary["val_images"]:
            raise UserError(f"{folder / VAL_SOFT}: {len(ids)} held-out images, its run held out {summary['val_images']} "
                            f"(damaged? delete {folder} and run again to retrain it)")
        if (parts and classes != parts[0][0]) or eval_classes != classes:
            raise UserError(f"{folder}: its val_soft.csv and submission_soft.csv name other classes than {finalist.name}'s fold0")
        fold_f1.append(score(labels, probs.argmax(1), len(classes))["f1"])
        parts.append((classes, (folder / VAL_SOFT, fold, ids, labels, probs)))
        if evals:  # the same eval images, in fold0's order
            eval_probs = eval_probs[alignment(evals[0][0], eval_ids, folder / SUBMISSION_SOFT, run_dir / finalist.name / "fold0")]
        evals.append((eval_ids if not evals else evals[0][0], eval_probs))
    oof = join_folds([part for _, part in parts], total=summary["train_images"] + summary["val_images"])
    return dict(ids=oof["ids"], labels=oof["labels"], probs=oof["probs"], classes=parts[0][0], fold_f1=fold_f1,
                eval_ids=evals[0][0], eval_probs=np.mean([e[1] for e in evals], axis=0))


def macro_f1(labels, probs):
    return score(labels, probs.argmax(1), probs.shape[1])["f1"]


def greedy_selection(oofs, labels, rounds=None):
    """Ensemble selection with replacement (Caruana et al. 2004, as auto-sklearn does): add, round by round,
    the member whose addition gives the averaged out-of-fold probabilities the best macro F1; keep the best
    ensemble seen. -> (weights summing to 1, its out-of-fold macro F1)."""
    rounds = rounds or 5 * len(oofs)
    counts, total, best = np.zeros(len(oofs)), np.zeros_like(oofs[0], dtype=np.float64), (-math.inf, None)
    for r in range(rounds):
        trial = [macro_f1(labels, (total + o) / (r + 1)) for o in oofs]
        j = int(np.argmax(trial))  # ties go to the earlier member: the better-ranked finalist
        counts[j] += 1
        total += oofs[j]
        if trial[j] > best[0]:
            best = (trial[j], counts / counts.sum())
    return best[1], best[0]


def rank_and_vote(run_dir, finalists, k, select):
    """Score every finalist out of fold on the same images and labels, pick, vote -> the report dict."""
    results = {f.name: finalist_scores(run_dir, f, k) for f in finalists}
    first = results[finalists[0].name]
    for name, r in results.items():
        if r["ids"] != first["ids"] or r["classes"] != first["classes"] or r["eval_ids"] != first["eval_ids"]:
            raise UserError(f"{name}: its folds cover other images or classes than {finalists[0].name}'s")
        if not np.array_equal(r["labels"], first["labels"]):
            raise UserError(f"{name}: its held-out images carry other labels than {finalists[0].name}'s "
                            f"(other data?): out-of-fold scores would not compare")
    rows = [dict(asdict(f), oof_f1=macro_f1(first["labels"], results[f.name]["probs"]), fold_f1_mean=float(np.mean(results[f.name]["fold_f1"])),
                 fold_f1_sd=float(np.std(results[f.name]["fold_f1"], ddof=1)) if k > 1 else 0.0) for f in finalists]
    winner = max(rows, key=lambda row: row["oof_f1"])
    weights, greedy_f1 = greedy_selection([results[f.name]["probs"] for f in finalists], first["labels"])
    chosen = {"winner": {winner["name"]: 1.0}, "greedy": {f.name: float(w) for f, w in zip(finalists, weights) if w > 0}}
    report = dict(k=k, select=select, finalists=rows, winner=winner["name"], winner_oof_f1=winner["oof_f1"],
                  greedy_weights=chosen["greedy"], greedy_oof_f1=greedy_f1, oof_images=len(first["ids"]),
                  eval_images=len(first["eval_ids"]), cost=dict(winner=k, greedy=k * len(chosen["greedy"])))
    if select == "soup":
        from search.soup import soup_vote  # lazy: torch and the data, only for a soup
        made = soup_vote(run_dir, finalists, winner["name"], k, first["eval_ids"])
        used = [n for n in made["ingredients"] if any(n in members for members in made["members"])]  # what some fold kept
        report.update(soup=dict(ingredients=made["ingredients"], members=made["members"], oof_f1=made["oof_f1"],
                                checkpoints=made["checkpoints"]),
                      cost=dict(report["cost"], soup=k), voted={f"the {k} fold soups of {' + '.join(used)}": 1.0})
        eval_probs = made["eval_probs"]
    else:
        report["voted"] = chosen[select]
        eval_probs = sum(w * results[name]["eval_probs"] for name, w in chosen[select].items())
    write_submission(run_dir, first["eval_ids"], eval_probs, first["classes"])
    return report


def write_report(run_dir, report):
    replace_atomically(run_dir / FINALIZE_REPORT, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    lines = [f"# finalize: experiment {report['experiment']}, {report['k']} folds", "",
             "| finalist | search trial | its val metric (one split) | out-of-fold macro F1 | fold F1 mean ± sd | flags |",
             "|---|---|---|---|---|---|"]
    for row in report["finalists"]:
        metric = "-" if row["search_metric"] is None else f"{row['search_metric']:.4f}"
        lines.append(f"| {row['name']} | {row['trial'] or '-'} | {metric} | {row['oof_f1']:.4f} | "
                     f"{row['fold_f1_mean']:.4f} ± {row['fold_f1_sd']:.4f} | `{' '.join(flag_words(row['params'])) or '(the trial command)'}` |")
    voted = ", ".join(f"{name} x {w:.2f}" for name, w in report["voted"].items())
    greedy = ", ".join(f"{name} x {w:.2f}" for name, w in report["greedy_weights"].items())
    cost = report["cost"]
    lines += ["", "| selection | out-of-fold macro F1 | models evaluated per image |", "|---|---|---|",
              f"| winner: {report['winner']}'s {report['k']} folds | {report['winner_oof_f1']:.4f} | {cost['winner']} |",
              f"| greedy ensemble: {greedy} | {report['greedy_oof_f1']:.4f} (optimistic: chosen on these predictions) | "
              f"{cost['greedy']} |"]
    if "soup" in report:
        folds = "; ".join(f"fold{i}: {' + '.join(m)}" for i, m in enumerate(report["soup"]["members"]))
        lines.append(f"| soup per fold ({folds}) | {report['soup']['oof_f1']:.4f} (optimistic: each chose on its fold) | "
                     f"{cost['soup']} |")
    lines += ["", f"Voted (--select {report['select']}): {voted}; soft-voted on {report['eval_images']} eval images "
              f"-> submission.csv, submission_soft.csv."]
    replace_atomically(run_dir / REPORT, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
