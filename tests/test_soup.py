"""search/soup.py: greedy model soups over real fold checkpoints (train.py --kfold runs on the tiny demo)."""
import numpy as np
import pytest
import torch

from conftest import FINALISTS
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


@pytest.mark.slow
def test_soup_vote_over_the_folds(fold_runs, demo_dir):
    finalists = [Finalist(name, {}) for name in FINALISTS]
    eval_ids = [line.split(",")[0] for line in (demo_dir / "eval" / "info.csv").read_text().splitlines()[1:]][::-1]
    result = soup.soup_vote(fold_runs, finalists, "defaults", 2, eval_ids, log=lambda line: None)
    assert result["ingredients"] == list(FINALISTS) and len(result["members"]) == 2
    assert result["eval_probs"].shape == (len(eval_ids), 18) and np.allclose(result["eval_probs"].sum(1), 1, atol=1e-5)
    assert 0 <= result["oof_f1"] <= 1


@pytest.mark.slow
def test_finalize_select_soup_reports_the_three_side_by_side(fold_runs):
    from search.vote import rank_and_vote, write_report
    finalists = [Finalist(name, {}) for name in FINALISTS]
    report = rank_and_vote(fold_runs, finalists, 2, "soup")
    assert report["soup"]["ingredients"] == list(FINALISTS) and report["cost"]["soup"] == 2
    assert report["cost"]["winner"] == 2 and report["cost"]["greedy"] == 2 * len(report["greedy_weights"])
    used = [n for n in FINALISTS if any(n in members for members in report["soup"]["members"])]  # not the candidates
    assert used and list(report["voted"]) == [f"the 2 fold soups of {' + '.join(used)}"]
    write_report(fold_runs, dict(report, experiment="test"))
    text = (fold_runs / "report.md").read_text()
    assert "| soup per fold (fold0: " in text and "models evaluated per image" in text and "Voted (--select soup)" in text
    assert (fold_runs / "submission.csv").is_file()


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
