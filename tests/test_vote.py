"""search/vote.py: greedy ensemble selection on crafted probabilities, and ranking on hand-written folds: a damaged
or foreign fold is named, never voted."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from core.labels import mask_class_names
from core.runs import write_submission, write_val_soft
from search import vote
from search.finalists import select_finalists
from test_finalists import CMD4, search, trial


# ----------------------------------------------------------------------------- ensemble selection
def test_greedy_selection_finds_complementary_members():
    labels = np.array([0, 0, 1, 1, 2, 2])
    sure0, sure1, sure2 = [0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]
    a = np.array([sure0, sure0, sure1, sure1, [0.4, 0.3, 0.3], [0.4, 0.3, 0.3]])  # right on 0 and 1, unsure and wrong on 2
    b = np.array([[0.3, 0.4, 0.3], [0.3, 0.4, 0.3], sure1, sure1, sure2, sure2])  # unsure and wrong on 0, right on 1 and 2
    c = np.full((6, 3), 1 / 3)                 # says nothing
    weights, f1 = vote.greedy_selection([c, a, b], labels)
    assert vote.macro_f1(labels, a) < 1 and vote.macro_f1(labels, b) < 1
    assert f1 == pytest.approx(1.0) and weights[0] == 0 and weights[1] > 0 and weights[2] > 0
    assert weights.sum() == pytest.approx(1)
    assert f1 == pytest.approx(vote.macro_f1(labels, weights[1] * a + weights[2] * b))


def test_greedy_selection_of_one_good_member_is_that_member():
    labels = np.array([0, 1, 2])
    good, bad = np.eye(3), np.eye(3)[[1, 2, 0]]
    weights, f1 = vote.greedy_selection([bad, good], labels)
    assert list(weights) == [0, 1] and f1 == 1.0


# Two folds of 4 held-out images each, 3 eval images: the files a fold run leaves, written by hand.
CLASSES18 = mask_class_names()


def fake_fold(folder, config, held_out, eval_ids, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(config, epochs=2, kfold=2, fold=int(folder.name[-1]))))
    (folder / "summary.json").write_text(json.dumps(dict(train_images=4, val_images=len(held_out), files=[])))
    write_val_soft(folder / "val_soft.csv", held_out, rng.integers(0, 18, len(held_out)), rng.dirichlet(np.ones(18), len(held_out)), CLASSES18)
    probs = rng.dirichlet(np.ones(18), len(eval_ids))
    write_submission(folder, eval_ids, probs, CLASSES18)
    return probs


@pytest.fixture
def fake_run(tmp_path):
    run_dir = tmp_path / "final"
    run_dir.mkdir()
    finalists = select_finalists(search(trial("t1", 0.9, lr=0.05)), CMD4)  # as finalize's first run plans them
    folds = [["a.jpg", "b.jpg", "c.jpg", "d.jpg"], ["e.jpg", "f.jpg", "g.jpg", "h.jpg"]]
    for f in finalists:
        for fold in range(2):
            fake_fold(run_dir / f.name / f"fold{fold}", f.config, folds[fold], ["x.jpg", "y.jpg", "z.jpg"], fold)
    return run_dir, finalists


def test_fake_folds_rank(fake_run):
    """Every finalist scored out of fold on the same 8 images, the best out-of-fold F1 the winner, and the submission
    its folds' eval probabilities averaged, in the folds' eval order."""
    run_dir, finalists = fake_run
    report = vote.rank_and_vote(run_dir, finalists, 2, "winner")
    assert report["oof_images"] == 8 and report["eval_images"] == 3
    rows = {row["name"]: row for row in report["finalists"]}
    assert list(rows) == [f.name for f in finalists] and all(0 <= row["oof_f1"] <= 1 for row in rows.values())
    assert report["winner_oof_f1"] == max(row["oof_f1"] for row in rows.values()) == rows[report["winner"]]["oof_f1"]
    assert report["voted"] == {report["winner"]: 1.0} and sum(report["greedy_weights"].values()) == pytest.approx(1)
    folds = [pd.read_csv(run_dir / report["winner"] / f"fold{i}" / "submission_soft.csv") for i in range(2)]
    voted = pd.read_csv(run_dir / "submission_soft.csv")
    assert list(voted["ImageID"]) == list(folds[0]["ImageID"]) == ["x.jpg", "y.jpg", "z.jpg"]
    np.testing.assert_allclose(voted[CLASSES18].to_numpy(), (folds[0][CLASSES18].to_numpy() + folds[1][CLASSES18].to_numpy()) / 2,
                               atol=1e-6)
    answers = pd.read_csv(run_dir / "submission.csv")
    assert list(answers["ans"]) == list(voted[CLASSES18].to_numpy().argmax(1))


def damage(run_dir, how):
    fold = run_dir / "defaults" / "fold0"
    if how == "truncated val_soft.csv":
        lines = (fold / "val_soft.csv").read_text().splitlines()
        (fold / "val_soft.csv").write_text("\n".join(lines[:3]) + "\n")
    elif how == "val_soft.csv deleted":
        (fold / "val_soft.csv").unlink()
    elif how == "empty submission_soft.csv":
        (fold / "submission_soft.csv").write_text("")
    elif how == "eval columns reordered":  # harmless: read by name
        table = pd.read_csv(fold / "submission_soft.csv")
        table[["ImageID", *CLASSES18[::-1]]].to_csv(fold / "submission_soft.csv", index=False)
        return None
    elif how == "another command":
        config = json.loads((fold / "config.json").read_text())
        (fold / "config.json").write_text(json.dumps(dict(config, steps=8)))
    elif how == "a fold's images held out twice":
        shutil.copyfile(run_dir / "defaults" / "fold0" / "val_soft.csv", run_dir / "defaults" / "fold1" / "val_soft.csv")
        return run_dir / "defaults" / "fold1"
    return fold


@pytest.mark.parametrize("how, message", [
    ("truncated val_soft.csv", "val_soft.csv: 2 held-out images, its run held out 4"),   # scored over 77 of 140, silently
    ("val_soft.csv deleted", "val_soft.csv: missing (delete "),                          # FileNotFoundError
    ("empty submission_soft.csv", "submission_soft.csv: not a readable CSV (No columns to parse from file)"),
    ("another command", "trained with another command than defaults's plan (--steps 4 -> 8)"),
    ("a fold's images held out twice", "is held out in fold0 too"),
    ("eval columns reordered", None),
])
def test_damaged_or_foreign_folds_are_named_not_voted(fake_run, how, message):
    """'top1' was blamed for a truncated defaults/fold0/val_soft.csv ("its folds cover other images")."""
    run_dir, finalists = fake_run
    before = vote.rank_and_vote(run_dir, finalists, 2, "winner")
    fold = damage(run_dir, how)
    if message is None:
        after = vote.rank_and_vote(run_dir, finalists, 2, "winner")
        assert after["finalists"] == before["finalists"]
        return
    with pytest.raises(ValueError) as e:
        vote.rank_and_vote(run_dir, finalists, 2, "winner")
    assert str(e.value).startswith(str(fold)) and message in str(e.value) and len(str(e.value).splitlines()) == 1, e.value
