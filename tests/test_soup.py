"""search/soup.py: greedy model soups over real fold checkpoints (train.py --kfold runs on the tiny demo)."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FINALISTS
from core.folds import join_folds
from core.metrics import score
from imagedata.layouts import read_eval
from search import soup
from search.finalists import Finalist
from training import checkpoint
from training.predict import predict_images


@pytest.mark.slow
def test_a_soup_of_one_ingredient_is_that_model(fold_runs):
    members, f1, probs, fold, model, meta = soup.fold_soup(fold_runs, ["top1"], 0, torch.device("cpu"), log=lambda line: None)
    alone, ckpt = checkpoint.load_model(fold_runs / "top1" / "fold0" / "best.pth")
    expected = predict_images(alone, ckpt, fold.paths, device="cpu", indices=fold.val_idx, batch_size=fold.batch_size, num_workers=0,
                              cache_dir=ckpt["args"]["cache_dir"])
    assert members == ["top1"] and np.array_equal(probs, expected)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), alone.state_dict().values()))


@pytest.mark.slow
@pytest.mark.parametrize("fold", [0, 1])
def test_a_soup_never_scores_below_its_best_ingredient_on_its_fold(fold_runs, fold):
    lines = []
    members, f1, probs, data, model, meta = soup.fold_soup(fold_runs, list(FINALISTS), fold, torch.device("cpu"), lines.append)
    alone = [data.held_out(checkpoint.load_model(fold_runs / n / f"fold{fold}" / "best.pth")[0], "single")[1] for n in FINALISTS]
    assert f1 >= max(alone) and members[0] == list(FINALISTS)[int(np.argmax(alone))]
    assert len(lines) == len(FINALISTS) - 1 and all("held-out F1" in line for line in lines)
    assert data.held_out(model, "single")[1] == pytest.approx(f1)  # the model handed back is the soup scored


@pytest.fixture
def own_runs(fold_runs, tmp_path):
    """A copy of the shared fold runs, for the tests that write a vote (soup.pth, report.md, submission.csv) into them."""
    return Path(shutil.copytree(fold_runs, tmp_path / "finalize"))


@pytest.mark.slow
def test_soup_vote_over_the_folds(own_runs, demo_dir):
    """Each fold's soup is saved as a checkpoint that predicts what the vote counted: its held-out images' F1, joined
    over the folds, is the reported out-of-fold F1, and its eval probabilities, averaged, are the vote's."""
    finalists = [Finalist(name, {}) for name in FINALISTS]
    eval_ids = [line.split(",")[0] for line in (demo_dir / "eval" / "info.csv").read_text().splitlines()[1:]][::-1]
    result = soup.soup_vote(own_runs, finalists, "defaults", 2, eval_ids, log=lambda line: None)
    assert result["ingredients"] == list(FINALISTS) and len(result["members"]) == 2
    assert result["eval_probs"].shape == (len(eval_ids), 18) and np.allclose(result["eval_probs"].sum(1), 1, atol=1e-5)
    parts, evals = [], []
    for i, saved in enumerate(result["checkpoints"]):
        model, meta = checkpoint.load_model(own_runs / saved)
        assert meta["soup"] == result["members"][i]
        fold = soup.Fold(meta, torch.device("cpu"), [own_runs / n / f"fold{i}" for n in FINALISTS])
        parts.append((f"fold{i}", i, fold.ids, fold.labels[fold.val_idx], fold.held_out(model, meta["classification"])[0]))
        ids, paths = read_eval(demo_dir / "eval", meta["layout"])
        probs = predict_images(model, meta, paths, device="cpu", num_workers=0, cache_dir=meta["args"]["cache_dir"])
        evals.append(probs[[ids.index(e) for e in eval_ids]])
    oof = join_folds(parts)
    assert result["oof_f1"] == pytest.approx(score(oof["labels"], oof["probs"].argmax(1), 18)["f1"])
    np.testing.assert_allclose(result["eval_probs"], np.mean(evals, axis=0), atol=1e-5)


@pytest.mark.slow
def test_finalize_select_soup_reports_the_three_side_by_side(own_runs):
    from search.vote import rank_and_vote, write_report
    finalists = [Finalist(name, {}) for name in FINALISTS]
    report = rank_and_vote(own_runs, finalists, 2, "soup")
    assert report["soup"]["ingredients"] == list(FINALISTS) and report["cost"]["soup"] == 2
    assert report["cost"]["winner"] == 2 and report["cost"]["greedy"] == 2 * len(report["greedy_weights"])
    used = [n for n in FINALISTS if any(n in members for members in report["soup"]["members"])]  # not the candidates
    assert used and list(report["voted"]) == [f"the 2 fold soups of {' + '.join(used)}"]
    write_report(own_runs, dict(report, experiment="test"))
    text = (own_runs / "report.md").read_text()
    assert "| soup per fold (fold0: " in text and "models evaluated per image" in text and "Voted (--select soup)" in text
    assert (own_runs / "submission.csv").is_file()


@pytest.mark.slow
def test_a_finalist_whose_folds_held_out_other_images_is_no_ingredient(fold_runs, tmp_path):
    """Another --seed splits otherwise: its fold k is not the winner's fold k, so souping it there would average models
    of different folds and score them on images some of them trained on."""
    import shutil
    run_dir = tmp_path / "final"
    shutil.copytree(fold_runs, run_dir)
    shutil.copytree(run_dir / "top1", run_dir / "seed7")
    for fold, other in ((0, 1), (1, 0)):  # its folds' held-out parts swapped: the same images, other folds
        shutil.copy(fold_runs / "top1" / f"fold{other}" / "val_soft.csv", run_dir / "seed7" / f"fold{fold}" / "val_soft.csv")
    names = soup.ingredients(run_dir, [Finalist(n, {}) for n in [*FINALISTS, "seed7"]], "defaults", 2)
    assert names == list(FINALISTS)
    with pytest.raises(ValueError, match="seed7/fold0: its held-out images differ from the"):
        soup.fold_soup(run_dir, ["defaults", "seed7"], 0, torch.device("cpu"), log=lambda line: None)
