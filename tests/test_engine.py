"""training/engine.py: one training epoch on real tensors, with gradient clipping, the weights' moving average and
the first-step time; validation and prediction with short batches padded; the CPU threads a trial takes."""
import copy
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from imagedata.augment import create_mix
from loss import create_criterion
from training import engine
from training.engine import train_one_epoch


def test_mixed_batches_train_on_soft_targets_and_count_the_larger_share():
    """--mixup: the loss is cross entropy against the mixed targets, what torch's takes as probabilities."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 18))
    x, y = torch.rand(32, 3, 2, 2), torch.randint(0, 18, (32,))
    seen = []

    def mix(batch, labels):
        mixed, target = create_mix(0.4, 0.0, 18)(batch, labels)
        seen.append(target)
        return mixed, target
    stats = train_one_epoch(model, DataLoader(TensorDataset(x, y), batch_size=16), device=torch.device("cpu"), augment=None,
                            normalize=torch.nn.Identity(), criterion=create_criterion("label_smoothing", smoothing=0.1),
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu", enabled=False),
                            classification="single", mix=mix)
    assert len(seen) == 2 and all(t.shape == (16, 18) for t in seen) and math.isfinite(stats["loss"]) and stats["loss"] > 0


def one_epoch(clip_grad):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 18))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.rand(16, 3, 2, 2) * 100, torch.randint(0, 18, (16,))  # large inputs: large gradients
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    stats = train_one_epoch(model, DataLoader(TensorDataset(x, y), batch_size=16), device=torch.device("cpu"), augment=None,
                            normalize=torch.nn.Identity(), criterion=create_criterion("cross_entropy"), optimizer=optimizer,
                            scaler=torch.amp.GradScaler("cpu", enabled=False), classification="single", clip_grad=clip_grad)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    return stats, moved


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_is_what_timms_model_ema_gives_for_the_same_steps(warmup):
    """--ema (and --ema_warmup): train_one_epoch updates timm's ModelEmaV3 once after every optimiser step with the
    run's step count, as timm's own train loop does, across epochs."""
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, 2, 2), torch.randint(0, 18, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 18), torch.nn.BatchNorm1d(18))
    by_hand, criterion = copy.deepcopy(model), create_criterion("cross_entropy")
    ema, hand_ema = (ModelEmaV3(m, decay=0.9, use_warmup=warmup) for m in (model, by_hand))
    optimizer, hand_opt = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(by_hand.parameters(), lr=0.5)
    step = 0
    for epoch in range(2):
        train_one_epoch(model, loader, device=torch.device("cpu"), augment=None, normalize=torch.nn.Identity(), criterion=criterion,
                        optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False), classification="single", ema=ema,
                        steps_before=epoch * len(loader))
        by_hand.train()
        for bx, by in loader:
            hand_opt.zero_grad()
            criterion(by_hand(bx), by).backward()
            hand_opt.step()
            step += 1
            hand_ema.update(by_hand, step=step)
    got, want, trained = ema.module.state_dict(), hand_ema.module.state_dict(), model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)  # buffers (BatchNorm's running statistics) included
    assert not torch.equal(got["1.weight"], trained["1.weight"])  # an average, not the trained weights


def test_clip_grad_bounds_the_step():
    _, free = one_epoch(clip_grad=0.0)
    stats, clipped = one_epoch(clip_grad=0.5)
    assert free > 5  # without clipping, one SGD step at lr 1 moves the weights far
    assert clipped <= 0.5 + 1e-5 and stats["loss"] > 0  # lr 1 x gradient norm clipped to 0.5


def test_first_step_time_only_when_asked():
    """train.py's summary.json takes first_step_s from here: seconds since this process started."""
    stats, _ = one_epoch(clip_grad=0.0)
    assert "first_step_s" not in stats
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 18))
    x, y = torch.rand(8, 3, 2, 2), torch.randint(0, 18, (8,))
    stats = train_one_epoch(model, DataLoader(TensorDataset(x, y), batch_size=4), device=torch.device("cpu"), augment=None,
                            normalize=torch.nn.Identity(), criterion=create_criterion("cross_entropy"),
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu", enabled=False),
                            classification="single", log_first_step=True)
    assert 0 < stats["first_step_s"] < 3600


def test_epoch_sums_are_the_per_step_reads():
    """The sums stay on the device and are read once: the same figures as reading every step's loss.item()."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 18))
    x, y = torch.randn(50, 3, 2, 2), torch.randint(0, 18, (50,))
    criterion, loader = create_criterion("cross_entropy"), DataLoader(TensorDataset(x, y), batch_size=16)
    with torch.no_grad():  # lr 0 below: the model these steps see never changes
        want_loss = sum(criterion(model(bx), by).item() * len(by) for bx, by in loader) / len(y)
        want_acc = sum((model(bx).argmax(1) == by).sum().item() for bx, by in loader) / len(y)
    stats = train_one_epoch(model, loader, device=torch.device("cpu"), augment=None, normalize=torch.nn.Identity(),
                            criterion=criterion, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                            scaler=torch.amp.GradScaler("cpu", enabled=False), classification="single")
    assert stats["loss"] == want_loss and stats["accuracy"] == want_acc


def test_a_diverged_epoch_fails_at_its_end():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 18))
    x, y = torch.rand(32, 3, 2, 2), torch.randint(0, 18, (32,))
    x[20] = float("nan")  # the second batch's loss is NaN
    with pytest.raises(FloatingPointError, match="loss is nan: training diverged"):
        train_one_epoch(model, DataLoader(TensorDataset(x, y), batch_size=16), device=torch.device("cpu"), augment=None,
                        normalize=torch.nn.Identity(), criterion=create_criterion("cross_entropy"),
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scaler=torch.amp.GradScaler("cpu", enabled=False),
                        classification="single")


def bn_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(18))
    model(torch.rand(2, 3, 6, 6))
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("pad_to", [None, 16, 40])
def test_padding_the_short_batch_changes_no_score(pad_to):
    """7 + 7 + 6 images in batches of 7: the short batch padded (to a given length; None: not padded) gives the
    same loss, probabilities and predictions as unpadded, row for row."""
    x, y = torch.rand(20, 3, 6, 6), torch.randint(0, 18, (20,))
    model, loader = bn_model(), DataLoader(TensorDataset(x, y), batch_size=7)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    common = dict(device=torch.device("cpu"), normalize=torch.nn.Identity(), classification="single")
    plain = engine.evaluate(model, loader, criterion=create_criterion("cross_entropy"), **common)
    padded = engine.evaluate(model, loader, criterion=create_criterion("cross_entropy"), pad_to=pad_to, **common)
    assert seen == [7, 7, 6, *([7, 7, 6] if pad_to is None else [pad_to] * 3)]
    np.testing.assert_allclose(padded["probs"], plain["probs"], atol=1e-6)
    assert padded["loss"] == pytest.approx(plain["loss"]) and (padded["preds"] == plain["preds"]).all()
    images = DataLoader(x, batch_size=7)
    np.testing.assert_allclose(engine.predict(model, images, tta=True, pad_to=pad_to, **common),
                               engine.predict(model, images, tta=True, **common), atol=1e-6)


def test_threads_are_the_usable_cores_shared_among_the_experiments_trials_here(monkeypatch):
    """Two other trials of this experiment (real processes whose environment names it) and one of another: this
    trial takes a third of the cores it may use; standalone all of them; a number given wins."""
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("NNI_EXP_ID", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set by the user (or a test worker): taken, as torch takes it
    assert engine.cpu_threads() == 1 and engine.cpu_threads(3) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert engine.cpu_threads() == cores and engine.cpu_threads(3) == 3
    others = [subprocess.Popen(["sleep", "30"], env=dict(os.environ, NNI_EXP_ID=exp, NNI_TRIAL_JOB_ID=job))
              for exp, job in [("expA", "t1"), ("expA", "t2"), ("expB", "t3")]]
    try:
        monkeypatch.setenv("NNI_EXP_ID", "expA")
        monkeypatch.setenv("NNI_TRIAL_JOB_ID", "t0")
        assert engine.trials_here() == 3  # t0 (this one), t1, t2: not expB's
        assert engine.cpu_threads() == max(cores // 3, 1)
    finally:
        for p in others:
            p.kill()
            p.wait()


def test_out_of_gpu_memory_standalone_is_one_line_naming_the_batch(monkeypatch):
    """(Under NNI it also names the trials sharing the GPU: tests/test_experiment_nni.py, in a real experiment.)"""
    from core.cli import Resumable
    monkeypatch.delenv("NNI_EXP_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(Resumable) as e, engine.out_of_memory_says(48):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 7.6 GiB")
    assert str(e.value) == ("out of GPU memory at --batch_size 48 (the GPU, Tried to allocate 20.00 MiB): lower --batch_size, "
                            "or end the other processes on that GPU")
