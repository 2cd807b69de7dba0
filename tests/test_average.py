"""training/average.py: the mean of state dicts, BatchNorm recomputed, a run's best epochs on disk, and the greedy
average that never scores below its best epoch on the validation it was chosen on."""
import pytest
import torch

from training.average import TopEpochs, averaged, greedy_soup, recompute_batchnorm


def small_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(16, 3))


def test_averaged_is_the_mean_and_one_state_is_itself():
    a, b = small_model(0).state_dict(), small_model(1).state_dict()
    mean = averaged([a, b])
    assert torch.allclose(mean["0.weight"], (a["0.weight"] + b["0.weight"]) / 2)
    assert torch.equal(mean["1.num_batches_tracked"], a["1.num_batches_tracked"])  # counters: the first's
    assert mean["0.weight"].dtype == torch.float32
    assert all(torch.equal(v, a[k]) for k, v in averaged([a]).items())  # averaging one epoch is that epoch


def test_recomputed_batchnorm_is_the_statistics_of_the_batches():
    model = small_model(0)
    x = torch.rand(32, 3, 2, 2)
    recompute_batchnorm(model, [(x[:16], None), (x[16:], None)], torch.nn.Identity(), torch.device("cpu"))
    h = model[0](x)
    assert torch.allclose(model[1].running_mean, h.mean((0, 2, 3)), atol=1e-6) and not model.training


def test_top_epochs_keeps_the_best_k_on_disk_and_again_after_a_resume(tmp_path):
    top = TopEpochs(tmp_path / "epochs", 2)
    for epoch, metric in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7), (5, 0.4)]:
        top.offer(epoch, metric, small_model(epoch))
    assert top.ranked() == [(0.7, 2), (0.7, 4)]  # ties: the earlier epoch first
    assert sorted(p.name for p in (tmp_path / "epochs").iterdir()) == ["epoch2.pth", "epoch4.pth"]
    assert torch.equal(top.state(4)["0.weight"], small_model(4).state_dict()["0.weight"])
    history = [dict(epoch=e, val_f1=m) for e, m in [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7), (5, 0.4)]]
    assert TopEpochs(tmp_path / "epochs", 2, history, "val_f1").ranked() == top.ranked()  # --resume finds them again
    top.clear()
    assert not (tmp_path / "epochs").exists()


def test_greedy_soup_never_scores_below_its_best_epoch(tmp_path):
    """Real weights scored by a real model on fixed data: an epoch joins only when the average scores no lower."""
    torch.manual_seed(3)
    x, y = torch.rand(64, 3, 2, 2), torch.randint(0, 3, (64,))

    def score(model):
        model.eval()
        with torch.no_grad():
            preds = model(x).argmax(1)
        return (preds == y).float().mean().item(), preds

    top = TopEpochs(tmp_path / "epochs", 6)
    for epoch in range(1, 7):  # one model's weights moved by noise (averages help), and unrelated models (they do not)
        model = small_model(0 if epoch % 2 else epoch)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        recompute_batchnorm(model, [(x, None)], torch.nn.Identity(), torch.device("cpu"))
        top.offer(epoch, score(model)[0], model)
    ranked = top.ranked()
    tries = []
    kept = greedy_soup([e for _, e in ranked], top.state, (ranked[0][0], "the best's"), small_model(0),
                       lambda m: recompute_batchnorm(m, [(x, None)], torch.nn.Identity(), torch.device("cpu")), score,
                       log=lambda members, candidate, metric, best: tries.append((candidate, metric >= best)))
    members, metric = kept.members, kept.metric
    assert members[0] == ranked[0][1] and metric >= ranked[0][0]
    assert [c for c, joined in tries if joined] == members[1:] and len(tries) == 5  # every other epoch tried once
    assert (kept.state is None) == (len(members) == 1) and 1 < len(members) < 6  # here: some joined, some were left out
    # the kept weights are the members' average, BatchNorm recomputed, and score what was reported
    soup = small_model(0)
    soup.load_state_dict(kept.state)
    assert score(soup)[0] == pytest.approx(metric) and torch.equal(score(soup)[1], kept.outputs)
    assert torch.allclose(kept.state["0.weight"], averaged([top.state(e) for e in members])["0.weight"])
