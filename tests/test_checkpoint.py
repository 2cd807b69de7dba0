"""training/checkpoint.py: the format, whole, in-process: keys and version, an epoch saved and read
back, refusal of other files, and what --resume restores and refuses."""
import shutil
import struct
import zipfile
from types import SimpleNamespace

import pytest
import torch
from conftest import crafted_checkpoint

from model import create_model
from optim import create_optimizer, create_scheduler
from training import checkpoint, flags

DATA = SimpleNamespace(classes=[f"c{i}" for i in range(18)], layout="mask", resize=(64, 48), mean=[0.5] * 3, std=[0.25] * 3)


def saved_epoch(run_dir, epoch=3, improved=True, **given):
    torch.manual_seed(0)
    model = create_model("BaseModel", 18, head="32", dropout=0.1)
    optimizer = create_optimizer("AdamW", model.parameters(), lr=0.01)
    scheduler = create_scheduler("cosine", optimizer, epochs=10)
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    config = dict(flags.defaults(), head="32", dropout=0.1, **given)
    meta = checkpoint.describe(config, DATA)
    checkpoint.save_epoch(run_dir, model, meta, improved=improved, epoch=epoch, best=0.7, history=[{"epoch": e} for e in range(1, epoch + 1)],
                          optimizer=optimizer, scheduler=scheduler, stale=1, generators=generators)
    return model, config


def test_an_epoch_saved_reads_back_with_every_key(tmp_path):
    model, config = saved_epoch(tmp_path)
    best, last = checkpoint.read(tmp_path / "best.pth"), checkpoint.read(tmp_path / "last.pth")
    for ckpt in (best, last):
        assert set(checkpoint.REQUIRED) <= set(ckpt) and ckpt["format"] == checkpoint.FORMAT_VERSION
        assert (ckpt["classes"], ckpt["resize"], ckpt["args"]) == (DATA.classes, [64, 48], config)
        assert ckpt["epoch"] == 3 and ckpt["best_metric"] == 0.7
    assert not set(checkpoint.TRAINING_STATE[1:]) & set(best)  # best.pth: weights and description only
    assert set(checkpoint.TRAINING_STATE) - {"ema"} <= set(last) and last["train_state"]["stale"] == 1  # ema: with --ema
    meta = checkpoint.read_meta(tmp_path / "last.pth")
    assert "state_dict" not in meta and "optimizer" not in meta and meta["head"] == "32"
    loaded, _ = checkpoint.load_model(tmp_path / "best.pth")
    x = torch.rand(2, 3, 64, 48)
    assert torch.allclose(loaded(x), model.eval()(x))


def test_not_improved_writes_last_only(tmp_path):
    saved_epoch(tmp_path, improved=False)
    assert (tmp_path / "last.pth").is_file() and not (tmp_path / "best.pth").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_newer_format_and_other_files_are_refused(tmp_path):
    saved_epoch(tmp_path)
    ckpt = torch.load(tmp_path / "best.pth", weights_only=True)
    torch.save(dict(ckpt, format=checkpoint.FORMAT_VERSION + 1), tmp_path / "future.pth")
    with pytest.raises(ValueError, match=f"future.pth: format {checkpoint.FORMAT_VERSION + 1} is newer than this code's"):
        checkpoint.read(tmp_path / "future.pth")
    torch.save({"state_dict": {}}, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="bare.pth: not a train.py checkpoint \\(no model, classification"):
        checkpoint.read(tmp_path / "bare.pth")
    old = {k: v for k, v in ckpt.items() if k not in ("format", checkpoint.HASH_KEY)}  # written before either: still read
    torch.save(old, tmp_path / "old.pth")
    assert checkpoint.read(tmp_path / "old.pth")["model"] == "BaseModel"
    crafted_checkpoint(tmp_path / "evil.pth", tmp_path / "pwned")
    with pytest.raises(ValueError, match="evil.pth: refused: it holds Python objects"):
        checkpoint.read(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def damage_largest_tensor(path, n=64):
    """Overwrite n bytes in the middle of the file's largest tensor. torch.save stores each tensor as an
    uncompressed zip entry, and torch.load checks no checksum: the file still loads, with other weights."""
    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 26)  # the local header's name and extra-field lengths; the data follows them
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        start = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
        f.seek(start)
        original = f.read(n)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in original))


@pytest.mark.parametrize("name", ["best.pth", "last.pth"])
def test_a_checkpoint_damaged_inside_its_tensors_is_refused(tmp_path, name):
    saved_epoch(tmp_path)
    path, intact = tmp_path / name, tmp_path / f"intact-{name}"
    shutil.copy(path, intact)
    damage_largest_tensor(path)
    assert path.read_bytes() != intact.read_bytes()
    torch.load(path, weights_only=True)  # loads: only the hash can tell
    model = create_model("BaseModel", 18, head="32", dropout=0.1)
    optimizer = create_optimizer("AdamW", model.parameters(), lr=0.01)
    uses = [checkpoint.read_meta, checkpoint.load_model,
            lambda p: checkpoint.restore(p, lr=0.01, model=model, optimizer=optimizer, generators=[], device="cpu",
                                         scheduler=create_scheduler("cosine", optimizer, epochs=10))]
    for use in uses:
        with pytest.raises(ValueError) as e:
            use(path)
        assert str(e.value) == f"checkpoint {path}: damaged or edited since it was saved (state_dict do not match its content hash)"
    assert checkpoint.read_meta(intact)[checkpoint.HASH_KEY] == checkpoint.content_hash(torch.load(intact, weights_only=True))


@pytest.mark.parametrize("edit, changed", [
    (lambda c: c["mean"].__setitem__(0, 0.9), "mean"),                   # inputs scaled otherwise
    (lambda c: c["classes"].reverse(), "classes"),                        # answers named otherwise
    (lambda c: c["args"].__setitem__("seed", 7), "args"),                 # the split rebuilt otherwise
    (lambda c: c.__setitem__("resize", [48, 64]), "resize"),
    (lambda c: c.__setitem__("extra", 1), "extra"),                       # a key added
    (lambda c: c.pop("best_metric"), "best_metric")])                    # ... or removed
def test_edited_metadata_is_refused_naming_what_changed(tmp_path, edit, changed):
    saved_epoch(tmp_path)
    ckpt = torch.load(tmp_path / "best.pth", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "edited.pth")
    with pytest.raises(ValueError) as e:
        checkpoint.read(tmp_path / "edited.pth")
    assert str(e.value) == (f"checkpoint {tmp_path / 'edited.pth'}: damaged or edited since it was saved ({changed} do not match "
                            f"its content hash)")


def test_a_checkpoint_without_its_hash_is_refused_and_format_2_still_reads(tmp_path):
    saved_epoch(tmp_path)
    ckpt = torch.load(tmp_path / "best.pth", weights_only=True)
    ckpt["state_dict"] = {k: -v if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    for version in (2, 3):
        torch.save({k: v for k, v in dict(ckpt, format=version).items() if k != checkpoint.HASH_KEY}, tmp_path / "bare.pth")
        with pytest.raises(ValueError, match=f"bare.pth: format {version} without its content hash \\(removed\\?\\): refused"):
            checkpoint.read(tmp_path / "bare.pth")
    torch.save(dict(ckpt, **{checkpoint.HASH_KEY: checkpoint.tensor_hash(ckpt)}), tmp_path / "v2_hash.pth")  # format 3, a format-2 hash
    with pytest.raises(ValueError, match="v2_hash.pth: damaged or edited since it was saved \\(its content hash is not one of format 3\\)"):
        checkpoint.read(tmp_path / "v2_hash.pth")
    v2 = dict(ckpt, format=2)
    v2[checkpoint.HASH_KEY] = checkpoint.tensor_hash(v2)  # what the last release wrote: its tensors checked
    torch.save(v2, tmp_path / "v2.pth")
    assert checkpoint.read(tmp_path / "v2.pth")["format"] == 2
    v2["state_dict"] = ckpt["state_dict"] | {"features.0.weight": torch.zeros(1)}
    torch.save(v2, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match="v2.pth: damaged \\(its tensors do not match"):
        checkpoint.read(tmp_path / "v2.pth")


def test_a_checkpoint_in_torchs_legacy_format_reads(tmp_path):
    saved_epoch(tmp_path)
    ckpt = torch.load(tmp_path / "best.pth", weights_only=True)
    torch.save(ckpt, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert checkpoint.read_meta(tmp_path / "legacy.pth")["classes"] == DATA.classes
    model, _ = checkpoint.load_model(tmp_path / "legacy.pth")
    x = torch.rand(2, 3, 64, 48)
    assert torch.equal(model(x), checkpoint.load_model(tmp_path / "best.pth")[0](x))


def test_restore_continues_where_last_pth_ended(tmp_path):
    saved_epoch(tmp_path)
    model = create_model("BaseModel", 18, head="32", dropout=0.1)
    optimizer = create_optimizer("AdamW", model.parameters(), lr=0.01)
    scheduler = create_scheduler("cosine", optimizer, epochs=6)  # a longer run: the schedule is re-planned
    generators = [torch.Generator(), torch.Generator()]
    start = checkpoint.restore(tmp_path / "last.pth", lr=0.01, model=model, optimizer=optimizer, scheduler=scheduler,
                               generators=generators, device="cpu")
    assert (start.epoch, start.best, len(start.history), start.stale) == (4, 0.7, 3, 1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * scheduler.lr_lambdas[0](3))
    assert generators[0].get_state().equal(torch.Generator().manual_seed(1).get_state())
    with pytest.raises(ValueError, match="best.pth: not a last.pth"):
        checkpoint.restore(tmp_path / "best.pth", lr=0.01, model=model, optimizer=optimizer, scheduler=scheduler,
                           generators=generators, device="cpu")


def test_resume_hint_reads_the_disk(tmp_path):
    assert checkpoint.resume_hint(tmp_path) == "no epoch finished, so there is nothing to resume"
    saved_epoch(tmp_path, epoch=5)
    assert checkpoint.resume_hint(tmp_path) == f"{tmp_path / 'last.pth'} holds epoch 5: continue with --resume {tmp_path / 'last.pth'}"


def test_restore_keeps_each_layer_groups_share_of_the_lr(tmp_path):
    """--layer_decay: every group's LR is its lr_scale times the schedule's, before and after a resume re-plans it."""
    saved_epoch(tmp_path)
    model = create_model("BaseModel", 18, head="32", dropout=0.1)
    params = list(model.parameters())
    groups = [dict(params=params[:2], lr=0.01 * 0.25, lr_scale=0.25), dict(params=params[2:], lr=0.01, lr_scale=1.0)]
    optimizer = create_optimizer("AdamW", groups, lr=0.01)
    scheduler = create_scheduler("cosine", optimizer, epochs=6, warmup_epochs=1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 * 0.25 / 2, 0.01 / 2])  # warmup scales each
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    state["optimizer"] = optimizer.state_dict()  # last.pth of a run with these groups
    state.pop(checkpoint.HASH_KEY)
    checkpoint.save(tmp_path / "last.pth", model, {k: v for k, v in state.items() if k != "state_dict"})
    checkpoint.restore(tmp_path / "last.pth", lr=0.01, model=model, optimizer=optimizer, scheduler=scheduler,
                       generators=[torch.Generator(), torch.Generator()], device="cpu")
    factor = scheduler.lr_lambdas[0](3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 * 0.25 * factor, 0.01 * factor])


@pytest.mark.parametrize("version", [0, 1, 2])
def test_a_hash_is_checked_whatever_the_format_says(tmp_path, version):
    # classes swapped and the format lowered: a lower format skipped the check, with content_hash still in the file
    saved_epoch(tmp_path)
    ckpt = torch.load(tmp_path / "best.pth", weights_only=True)
    ckpt["classes"][:2] = ckpt["classes"][1::-1]
    torch.save(dict(ckpt, format=version), tmp_path / "edited.pth")
    with pytest.raises(ValueError) as e:
        checkpoint.read(tmp_path / "edited.pth")
    assert str(e.value) == (f"checkpoint {tmp_path / 'edited.pth'}: damaged or edited since it was saved (classes, format do not "
                            f"match its content hash)")
    if version < 2:  # a format-2 hash (the tensors') under a lower format is checked as format 2 checks it
        v2 = dict(ckpt, format=version, state_dict=dict(ckpt["state_dict"], **{"features.0.weight": torch.zeros(1)}))
        torch.save(dict(v2, **{checkpoint.HASH_KEY: checkpoint.tensor_hash(ckpt)}), tmp_path / "v2.pth")
        with pytest.raises(ValueError, match="v2.pth: damaged \\(its tensors do not match"):
            checkpoint.read(tmp_path / "v2.pth")


def test_a_checkpoint_from_before_hashes_reads_with_one_warning_line(tmp_path, capsys):
    saved_epoch(tmp_path)
    ckpt = torch.load(tmp_path / "best.pth", weights_only=True)
    torch.save({k: v for k, v in dict(ckpt, format=1).items() if k != checkpoint.HASH_KEY}, tmp_path / "v1.pth")
    checkpoint.read_meta(tmp_path / "v1.pth")
    checkpoint.load_model(tmp_path / "v1.pth")  # read twice, warned once
    assert capsys.readouterr().err == (f"warning: checkpoint {tmp_path / 'v1.pth'}: format 1, from before checkpoints carried a "
                                       f"content hash: read unchecked\n")


def plateau_run(lr, weight_decay, momentum, gamma, patience, scales=(0.25, 1.0)):
    """An SGD model with two layer groups (their LRs lr_scale x lr) under ReduceLROnPlateau."""
    torch.manual_seed(0)
    model = create_model("BaseModel", 18, head="32", dropout=0.1)
    params = list(model.parameters())
    groups = [dict(params=params[:2], lr=lr * scales[0], lr_scale=scales[0], weight_decay=weight_decay),
              dict(params=params[2:], lr=lr * scales[1], lr_scale=scales[1], weight_decay=weight_decay)]
    optimizer = create_optimizer("SGD", groups, lr=lr, weight_decay=weight_decay, momentum=momentum)
    return model, optimizer, create_scheduler("plateau", optimizer, epochs=10, lr_decay_step=patience, gamma=gamma)


def test_restore_takes_the_optimiser_settings_given_now_and_keeps_what_the_run_accumulated(tmp_path):
    """--resume with a new --lr, --weight_decay, --momentum, --lr_gamma, --lr_decay_step under plateau: the saved optimiser
    and schedule state used to override them all. The plateau's cut so far stays, as a share of the LR given now, and each
    layer group keeps its share of it; the momentum buffers and the plateau's count carry on."""
    model, optimizer, scheduler = plateau_run(lr=0.01, weight_decay=1e-4, momentum=0.9, gamma=0.1, patience=1)
    model(torch.rand(2, 3, 64, 48)).sum().backward()
    optimizer.step()
    for metric in (0.5, 0.4, 0.4, 0.3):  # two epochs no better: the plateau cuts the LR by 0.1; one more counts
        scheduler.step(metric)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 * 0.25 * 0.1, 0.01 * 0.1])
    meta = checkpoint.describe(dict(flags.defaults(), head="32", dropout=0.1, lr=0.01, weight_decay=1e-4, momentum=0.9), DATA)
    checkpoint.save(tmp_path / "best.pth", model, meta, epoch=1, best_metric=0.5)
    checkpoint.save_epoch(tmp_path, model, meta, improved=False, epoch=4, best=0.5, history=[{"epoch": e} for e in range(1, 5)],
                          optimizer=optimizer, scheduler=scheduler, stale=3, generators=[])
    model, optimizer, scheduler = plateau_run(lr=0.02, weight_decay=0.05, momentum=0.5, gamma=0.5, patience=3)
    start = checkpoint.restore(tmp_path / "last.pth", lr=0.02, model=model, optimizer=optimizer, scheduler=scheduler,
                               generators=[], device="cpu")
    assert start.epoch == 5
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02 * 0.25 * 0.1, 0.02 * 0.1])
    assert [(g["weight_decay"], g["momentum"], g["lr_scale"]) for g in optimizer.param_groups] == [(0.05, 0.5, 0.25), (0.05, 0.5, 1.0)]
    assert optimizer.state and all("momentum_buffer" in s for s in optimizer.state.values())
    assert (scheduler.factor, scheduler.patience, scheduler.num_bad_epochs, scheduler.best) == (0.5, 3, 1, 0.5)
    assert scheduler.get_last_lr() == [g["lr"] for g in optimizer.param_groups]
    saved = torch.load(tmp_path / "last.pth", weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["weight_decay"] == 1e-4  # the file is as it was: only this run changed


def test_restore_starts_from_what_best_pth_holds(tmp_path):
    """--average_epochs may leave best.pth better than any epoch: the resumed run's best to beat is best.pth's, not the
    best epoch's that last.pth recorded (a worse later epoch replaced the better average)."""
    model, _ = saved_epoch(tmp_path)  # best 0.7 in both files
    meta = {k: v for k, v in checkpoint.read_meta(tmp_path / "best.pth").items() if k not in ("state_dict", checkpoint.HASH_KEY)}
    checkpoint.save(tmp_path / "best.pth", model, dict(meta, best_metric=0.8, averaged_epochs=[3, 2]))
    optimizer = create_optimizer("AdamW", model.parameters(), lr=0.01)
    start = checkpoint.restore(tmp_path / "last.pth", lr=0.01, model=model, optimizer=optimizer, generators=[], device="cpu",
                               scheduler=create_scheduler("cosine", optimizer, epochs=10))
    assert start.best == 0.8


def test_an_interruption_after_training_says_what_is_done_and_how_to_finish(tmp_path):
    saved_epoch(tmp_path, epoch=5)
    last = tmp_path / "last.pth"
    assert checkpoint.resume_hint(tmp_path, "the eval prediction") == (
        f"training finished ({last} holds its last epoch, 5; {tmp_path / 'best.pth'} its best, epoch 5), but the eval "
        f"prediction was interrupted: write what is missing with --resume {last}")
    with pytest.raises(KeyboardInterrupt) as e:
        with checkpoint.interruption_says(tmp_path):
            with checkpoint.interruption_says(tmp_path, "writing summary.json"):
                raise KeyboardInterrupt(2)
    assert e.value.__notes__ == [checkpoint.resume_hint(tmp_path, "writing summary.json")]  # the innermost stage's


def test_an_nni_trial_continues_its_own_last_pth_or_its_retried_trials_and_otherwise_says_why_not(tmp_path, capsys):
    trials = tmp_path / "trials"
    failed, retry, fresh = trials / "AAAAA", trials / "BBBBB", trials / "CCCCC"
    for d in (failed, retry, fresh):
        d.mkdir(parents=True)
    _, config = saved_epoch(failed)
    (failed / "history.csv").write_text("epoch\n1\n2\n3\n")
    assert checkpoint.continued(fresh, config) is None and capsys.readouterr().out == ""  # nothing to continue: silent
    assert checkpoint.continued(failed, config) == failed / "last.pth"  # NNI reran it under its own id
    assert capsys.readouterr().out == f"continuing {failed / 'last.pth'}\n"

    assert checkpoint.continued(retry, config, {"trial": "AAAAA"}) == retry / "last.pth"
    assert capsys.readouterr().out == f"continuing {failed / 'last.pth'} (trial AAAAA, which this one retries)\n"
    assert sorted(p.name for p in retry.iterdir()) == ["best.pth", "history.csv", "last.pth"]
    assert checkpoint.read(retry / "last.pth")["epoch"] == 3

    refusals = [(dict(config, lr=config["lr"] * 2), {"trial": "AAAAA"}, f"it was trained with --lr {config['lr']}, this run has "
                                                                        f"{config['lr'] * 2}"),
                (dict(config, reshuffle_val=True), {"trial": "AAAAA"}, "--reshuffle_val gives every trial its own validation people"),
                (config, {"trial": "ZZZZZ"}, "not on this machine")]
    for given, note, why in refusals:
        assert checkpoint.continued(fresh, given, note) is None and not any(fresh.iterdir())
        source = trials / note["trial"] / "last.pth"
        assert capsys.readouterr().out == f"not continuing {source} (trial {note['trial']}, which this one retries): {why}; starting over\n"
    damage_largest_tensor(failed / "last.pth")
    assert checkpoint.continued(fresh, config, {"trial": "AAAAA"}) is None
    assert "damaged" in capsys.readouterr().out and not any(fresh.iterdir())


def test_a_fold_that_finalize_trains_again_continues_the_unfinished_one_of_its_own_flags(tmp_path, capsys):
    """finalize's rerun hands every fold trial the dirs of the earlier folds that did not finish, of every finalist and
    fold, some on other machines: each takes the one whose last.pth has its very flags, and says so."""
    earlier = tmp_path / "old_experiment" / "trials"
    for name in ("FOLD0", "FOLD1"):
        (earlier / name).mkdir(parents=True)
    saved_epoch(earlier / "FOLD0", kfold=2, fold=0)
    _, config = saved_epoch(earlier / "FOLD1", kfold=2, fold=1)
    dirs = [str(earlier / "GONE1"), str(earlier / "FOLD0"), str(earlier / "FOLD1")]  # another machine's, another fold's, its own
    own = tmp_path / "new_experiment" / "trials" / "NEW01"
    own.mkdir(parents=True)
    assert checkpoint.continued(own, dict(config, lr=config["lr"] * 2), {"dirs": dirs}) is None and not any(own.iterdir())
    assert capsys.readouterr().out == ("not continuing an earlier fold: none of the 3 folds that did not finish left a last.pth "
                                       "of these flags here; starting over\n")
    assert checkpoint.continued(own, config, {"dirs": dirs}) == own / "last.pth"
    assert capsys.readouterr().out == (f"continuing {earlier / 'FOLD1' / 'last.pth'} (this fold's, which an earlier fold "
                                       f"experiment did not finish)\n")
    assert checkpoint.read(own / "last.pth")["epoch"] == 3
