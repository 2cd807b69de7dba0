"""baseline/export.py and training/onnxfile.py: the exported file predicts as PyTorch does on the demo's real images
(one model of each kind, a vote, the flip), carries its metadata, runs in inference.py like a checkpoint, and a
finalize run's selection exported as one file reproduces its submission_soft.csv."""
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import model
from baseline import export, inference
from conftest import FINALISTS, ROOT, read_csv, run_cli, train_env
from core.labels import mask_class_names
from search.finalists import Finalist, ran_configuration
from search.vote import rank_and_vote, write_report
from training import checkpoint, onnxfile
from training.predict import predict_checkpoints

QUIET = dict(log=lambda line: None, num_workers=0)


def untrained(path, name, classification="single", resize=(64, 48), classes=None):
    """A real checkpoint of an untrained model, initialised (kaiming) and its classifier scaled up so that its
    probabilities move from image to image (a near-uniform answer would match anything; efficientnet-pytorch's own
    initialisation fades to zero)."""
    classes = classes or mask_class_names()
    meta = dict(format=checkpoint.FORMAT_VERSION, model=name, classification=classification, head="", dropout=0.0, classes=classes,
                layout="mask", resize=list(resize), mean=[0.5, 0.45, 0.4], std=[0.2] * 3, metric="accuracy", args={})
    torch.manual_seed(0)
    net = model.create_model(name, model.num_outputs(classification, len(classes)), init="kaiming", resize=resize)
    with torch.no_grad():
        net.head[-1].weight.mul_(100)
    checkpoint.save(path, net, meta, epoch=1, best_metric=0.5)
    return path


MODELS = {  # (model, head design, input size): each kind of network the registry builds
    "BaseModel": ("BaseModel", "single", (64, 48)),
    "efficientnet-pytorch": ("efficientnet_b0", "single", (64, 64)),
    "timm": ("timm/mobilenetv3_small_050", "single", (64, 64)),
    "multi-head": ("BaseModel", "multi_head", (48, 32)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    return {kind: untrained(folder / f"{kind}.pth", *spec) for kind, spec in MODELS.items()}


def probs_of(paths, demo_dir, cache_dir, tta=False):
    return predict_checkpoints(paths, demo_dir / "eval", tta=tta, cache_dir=cache_dir, **QUIET)[1]


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_file_predicts_as_pytorch_on_real_images(kind, checkpoints, demo_dir, cache_dir, capsys):
    code, out, err = run_cli(export.cli, capsys, checkpoints[kind])
    assert code == 0, err
    exported = checkpoints[kind].with_suffix(".onnx")
    assert f"wrote {exported}" in out and "onnxruntime matches PyTorch" in out
    expected, got = probs_of([checkpoints[kind]], demo_dir, cache_dir), probs_of([exported], demo_dir, cache_dir)
    assert got.shape == expected.shape == (14, 18)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.ptp(expected, axis=0).max() > 1e-3  # the answers move with the image by 10x the tolerance: it has teeth


@pytest.mark.parametrize("inside", [True, False])
def test_tta_inside_the_graph_or_around_it(inside, checkpoints, demo_dir, cache_dir, tmp_path):
    out = tmp_path / "m.onnx"
    onnxfile.export([(checkpoints["BaseModel"], 1.0)], out, tta=inside, log=lambda line: None)
    expected = probs_of([checkpoints["BaseModel"]], demo_dir, cache_dir, tta=True)
    assert np.abs(probs_of([out], demo_dir, cache_dir, tta=True) - expected).max() <= 1e-4
    plain = probs_of([checkpoints["BaseModel"]], demo_dir, cache_dir)
    assert np.abs(probs_of([out], demo_dir, cache_dir) - (expected if inside else plain)).max() <= 1e-4
    assert np.abs(expected - plain).max() > 1e-4  # the flip changes the answer


def test_metadata_round_trips_and_a_runtime_reads_it_alone(checkpoints, tmp_path, capsys):
    out = tmp_path / "vote.onnx"
    members = [checkpoints["BaseModel"], checkpoints["multi-head"]]
    assert run_cli(export.cli, capsys, *members, "--out", out, "--tta")[0] == 0
    meta = onnxfile.read_meta(out)
    assert meta["classes"] == mask_class_names() and meta["layout"] == "mask" and meta["tta"] is True
    assert meta["inputs"] == {"image_64x48": [64, 48], "image_48x32": [48, 32]}  # one input per size
    assert meta["mean"] == [0.5, 0.45, 0.4] and meta["std"] == [0.2] * 3 and "centre-cropped" in meta["preprocessing"]
    assert [(m["checkpoint"], m["weight"], m["classification"]) for m in meta["members"]] == \
        [(str(members[0]), 0.5, "single"), (str(members[1]), 0.5, "multi_head")]
    assert meta["exported_from"] == " + ".join(map(str, members)) and meta["project_version"] not in ("", None)
    assert meta["versions"] == dict(torch=torch.__version__, onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    # what a deployment sees with onnxruntime alone: JSON metadata, a dynamic batch axis, probabilities
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == mask_class_names()
    assert [(i.name, i.type, i.shape[1:]) for i in session.get_inputs()] == \
        [("image_64x48", "tensor(uint8)", [3, 64, 48]), ("image_48x32", "tensor(uint8)", [3, 48, 32])]
    for batch in (1, 5):
        feed = {i.name: np.zeros((batch, *i.shape[1:]), np.uint8) for i in session.get_inputs()}
        probs = session.run(["probs"], feed)[0]
        assert probs.shape == (batch, 18) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_inference_on_the_file_writes_what_it_writes_on_the_checkpoints(checkpoints, demo_dir, cache_dir, tmp_path, capsys):
    members = [checkpoints["BaseModel"], checkpoints["multi-head"], checkpoints["timm"]]  # three sizes, two head designs
    assert run_cli(export.cli, capsys, *members, "--out", tmp_path / "vote.onnx")[0] == 0
    common = ["--eval_dir", demo_dir / "eval", "--cache_dir", cache_dir, "--num_workers", 0, "--batch_size", 5]
    assert run_cli(inference.cli, capsys, "--checkpoint", *members, "--out", tmp_path / "pth", *common)[0] == 0
    code, out, err = run_cli(inference.cli, capsys, "--checkpoint", tmp_path / "vote.onnx", "--out", tmp_path / "onnx", *common)
    assert code == 0 and err == "" and "ONNX, 3 models" in out
    assert read_csv(tmp_path / "onnx" / "submission.csv") == read_csv(tmp_path / "pth" / "submission.csv")
    soft = [np.array([[float(v) for k, v in r.items() if k != "ImageID"] for r in read_csv(tmp_path / d / "submission_soft.csv")])
            for d in ("pth", "onnx")]
    assert np.abs(soft[0] - soft[1]).max() <= 1e-4


class FFT(torch.nn.Module):
    """A backbone whose operator (rfft2) has no ONNX form at opset 17."""
    num_features = 3

    def forward(self, x):
        return torch.fft.rfft2(x).abs().mean((2, 3))


def test_a_model_that_does_not_export_is_named_with_its_operator(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(model.MODELS, "FFTNet", lambda pretrained=False, resize=None: FFT())
    ckpt = untrained(tmp_path / "fft.pth", "FFTNet", resize=(32, 32))
    code, out, err = run_cli(export.cli, capsys, ckpt)
    assert code == 1 and out == ""
    assert err == f"export.py: error: {ckpt} (FFTNet) does not export to ONNX: operator aten::fft_rfft2 has no ONNX form at opset 17\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fft.pth"]


def test_a_file_that_does_not_reproduce_pytorch_is_not_kept(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setattr(onnxfile, "TOLERANCE", -1.0)  # no difference passes
    with pytest.raises(ValueError, match="onnxruntime's probabilities differ from PyTorch's by .* the file was not kept"):
        onnxfile.export([(checkpoints["BaseModel"], 1.0)], tmp_path / "m.onnx", log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def plain_onnx(path):
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(path), dynamo=False)
    return path


REFUSALS = {  # -> (argv, what the one line says)
    "a finalize run without a finished selection": (
        lambda c, t: ([(t / "finalize_x" / "defaults" / "fold0").mkdir(parents=True) or t / "finalize_x"],
                      f"{t / 'finalize_x'}: no finalize.json, so finalize has not finished a selection there")),
    "a folder that is no run": (
        lambda c, t: ([(t / "photos").mkdir() or t / "photos"], "photos: neither a train.py run dir (no best.pth) nor a finalize run dir")),
    "a soup that finalize did not make": (
        lambda c, t: ([finished_report(t / "finalize_y"), "--select", "soup"], "finalize ran --select winner there, so it made no soups")),
    "a damaged finalize.json": (
        lambda c, t: ([finished_report(t / "finalize_z", text="{"), ], "finalize.json: damaged")),
    "no such checkpoint": (lambda c, t: ([t / "nope.pth"], "nope.pth: no such file")),
    "not a checkpoint": (lambda c, t: ([write(t / "a.pth", "text")], "a.pth: not a PyTorch file")),
    "two checkpoints, no --out": (lambda c, t: ([c["BaseModel"], c["multi-head"]], "2 checkpoints are one vote: say where")),
    "--out not .onnx": (lambda c, t: ([c["BaseModel"], "--out", t / "m.bin"], "--out " + str(t / "m.bin") + ": name it *.onnx")),
    "--select on a checkpoint": (lambda c, t: ([c["BaseModel"], "--select", "greedy"], "--select greedy: picks from a finalize run dir")),
    "classes that differ": (
        lambda c, t: ([c["BaseModel"], untrained(t / "ab.pth", "BaseModel", classes=["a", "b"]), "--out", t / "v.onnx"],
                      "checkpoints disagree on classes")),
    # the output is checked before the export: mkdir's FileExistsError, or a folder, after the work
    "--out under a file": (lambda c, t: ([c["BaseModel"], "--out", write(t / "f", "") / "m.onnx"],
                                         f"--out {t / 'f' / 'm.onnx'}: cannot write there ({t / 'f'} is a file)")),
    "--out a folder": (lambda c, t: ([c["BaseModel"], "--out", (t / "m.onnx").mkdir() or t / "m.onnx"],
                                     f"--out {t / 'm.onnx'}: a folder, not a file")),
    "the default --out a folder": (lambda c, t: ([shutil.copy(c["BaseModel"], t / "b.pth")] if (t / "b.onnx").mkdir() is None else [],
                                                 f"{t / 'b.onnx'} (the default --out): a folder, not a file")),
    "an exported file as the source": (lambda c, t: ([write(t / "m.onnx", "")], "m.onnx: an exported file, not a checkpoint")),
}


def write(path, text):
    path.write_text(text)
    return path


def finished_report(folder, text=None):
    folder.mkdir(parents=True)
    report = dict(select="winner", k=2, winner="defaults", greedy_weights={"defaults": 1.0})
    (folder / "finalize.json").write_text(text if text is not None else json.dumps(report))
    return folder


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_is_one_line_and_writes_nothing(case, checkpoints, tmp_path, capsys):
    argv, expected = REFUSALS[case](checkpoints, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli(export.cli, capsys, *argv)
    assert code == 1 and out == "" and len(err.splitlines()) == 1 and err.startswith("export.py: error: ") and expected in err, err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the plain file's exporter: what a user without imgcls-export uses
@pytest.mark.parametrize("what, expected", [
    ("text", "bad.onnx: not an ONNX file"),
    ("plain", "plain.onnx: an ONNX file without this project's metadata"),
])
def test_inference_refuses_an_onnx_file_not_exported_here(what, expected, demo_dir, tmp_path, capsys):
    path = write(tmp_path / "bad.onnx", "not a model") if what == "text" else plain_onnx(tmp_path / "plain.onnx")
    code, _, err = run_cli(inference.cli, capsys, "--checkpoint", path, "--eval_dir", demo_dir / "eval", "--out", tmp_path / "out")
    assert code == 1 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- a finalize run's selection
def soft_csv(path):
    rows = read_csv(path)
    return [r["ImageID"] for r in rows], np.array([[float(v) for k, v in r.items() if k != "ImageID"] for r in rows])


def exported_reproduces_finalize(run_dir, select, demo_dir, cache_dir, capsys):
    """Export the run's selection, run it through inference.py -> (its submission dir, the exported file)."""
    code, out, err = run_cli(export.cli, capsys, run_dir, "--select", select)
    assert code == 0, err
    onnx_file = run_dir / f"{select}.onnx"
    assert run_cli(inference.cli, capsys, "--checkpoint", onnx_file, "--eval_dir", demo_dir / "eval", "--out", run_dir / "pred",
                   "--cache_dir", cache_dir, "--num_workers", 0)[0] == 0
    ids, expected = soft_csv(run_dir / "submission_soft.csv")
    got_ids, got = soft_csv(run_dir / "pred" / "submission_soft.csv")
    assert got_ids == ids and np.abs(got - expected).max() <= 2e-5  # finalize's CSV holds 6 decimals of means of 6 decimals
    assert read_csv(run_dir / "pred" / "submission.csv") == read_csv(run_dir / "submission.csv")
    return run_dir / "pred", onnx_file


@pytest.mark.slow
def test_the_winners_k_fold_vote_and_the_greedy_ensemble_as_one_file(fold_runs, demo_dir, cache_dir, tmp_path, capsys):
    run_dir = tmp_path / "finalize"
    shutil.copytree(fold_runs, run_dir)
    finalists = [Finalist(name, {}) for name in FINALISTS]
    for select in ("greedy", "winner"):  # winner last: its submission.csv is the folds' own vote, below
        write_report(run_dir, dict(rank_and_vote(run_dir, finalists, 2, select), experiment="test"))
        pred, onnx_file = exported_reproduces_finalize(run_dir, select, demo_dir, cache_dir, capsys)
        assert len(onnxfile.read_meta(onnx_file)["members"]) == 2 * len(json.loads((run_dir / "finalize.json").read_text())
                                                                              ["voted" if select == "winner" else "greedy_weights"])
    # inference on the fold checkpoints themselves writes the same answers as on the file
    winner = json.loads((run_dir / "finalize.json").read_text())["winner"]
    folds = [run_dir / winner / f"fold{i}" / "best.pth" for i in range(2)]
    assert run_cli(inference.cli, capsys, "--checkpoint", *folds, "--eval_dir", demo_dir / "eval", "--out", run_dir / "pth",
                   "--cache_dir", cache_dir, "--num_workers", 0)[0] == 0
    assert read_csv(run_dir / "pth" / "submission.csv") == read_csv(pred / "submission.csv")


@pytest.mark.slow
def test_the_fold_soups_as_one_file(fold_runs, demo_dir, cache_dir, tmp_path, capsys):
    run_dir = tmp_path / "finalize"
    shutil.copytree(fold_runs, run_dir)
    report = rank_and_vote(run_dir, [Finalist(name, {}) for name in FINALISTS], 2, "soup")
    write_report(run_dir, dict(report, experiment="test"))
    assert report["soup"]["checkpoints"] == ["fold0/soup.pth", "fold1/soup.pth"]
    assert checkpoint.read_meta(run_dir / "fold0" / "soup.pth")["soup"] == report["soup"]["members"][0]
    _, onnx_file = exported_reproduces_finalize(run_dir, "soup", demo_dir, cache_dir, capsys)
    assert onnxfile.read_meta(onnx_file)["exported_from"] == f"{run_dir} (finalize --select soup)"
    soups = [run_dir / path for path in report["soup"]["checkpoints"]]
    shutil.copy(soups[1], soups[0])  # fold1's soup as fold0's: not what finalize voted
    code, _, err = run_cli(export.cli, capsys, run_dir, "--select", "soup")
    assert code == 1 and err.startswith(f"export.py: error: {soups[0]}: trained as fold 1 of 2, not as "), err


def test_an_out_that_cannot_be_written_is_one_line_before_any_work(checkpoints, read_only_dir, capsys, monkeypatch):
    monkeypatch.setattr(onnxfile, "export", lambda *a, **k: pytest.fail("exported before checking --out"))
    code, out, err = run_cli(export.cli, capsys, checkpoints["BaseModel"], "--out", read_only_dir / "sub" / "m.onnx")
    assert (code, out) == (1, "")
    assert err == f"export.py: error: --out {read_only_dir / 'sub' / 'm.onnx'}: cannot write there (Read-only file system)\n"


# ----------------------------------------------------------------------------- an exported file edited
def with_metadata(src, dst, changes=None, drop=(), graph=None, rehash=False):
    """src's file with its metadata entries changed (JSON values) or dropped, or another graph's (graph: a file) under
    them; rehash: its content hash recomputed over the edit, as a forger (or a bug) would."""
    model = onnx.load(str(src))
    entries = {p.key: p.value for p in model.metadata_props}
    if graph is not None:
        model = onnx.load(str(graph))
    entries.update({k: json.dumps(v) for k, v in (changes or {}).items()})
    del model.metadata_props[:]
    for key, value in entries.items():
        if key not in drop and not (rehash and key == onnxfile.HASH_KEY):
            model.metadata_props.add(key=key, value=value)
    if rehash:
        model.metadata_props.add(key=onnxfile.HASH_KEY, value=json.dumps(onnxfile.content_hash(model)))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """The BaseModel's file, the same model with the flip inside (another graph, the same inputs), and a 5-class one."""
    folder = tmp_path_factory.mktemp("exported")
    five = untrained(folder / "five.pth", "BaseModel", classes=list("abcde"))
    files = dict(plain=(checkpoints["BaseModel"], False), flip=(checkpoints["BaseModel"], True), five=(five, False))
    for name, (ckpt, tta) in files.items():
        onnxfile.export([(ckpt, 1.0)], folder / f"{name}.onnx", tta=tta, log=lambda line: None)
    return {name: folder / f"{name}.onnx" for name in files}


def refused_by_inference(path, demo_dir, tmp_path, capsys):
    """inference.py on the file -> its one line, checking that it refused and wrote nothing."""
    code, out, err = run_cli(inference.cli, capsys, "--checkpoint", path, "--eval_dir", demo_dir / "eval", "--out", tmp_path / "out")
    assert (code, out) == (1, "") and len(err.splitlines()) == 1 and err.startswith("inference.py: error: "), err
    assert not (tmp_path / "out").exists()
    return err.removeprefix("inference.py: error: ").rstrip("\n")


EDITED = {  # -> (the edit, what the line says after the file's name): each ran as if genuine
    "classes reordered": (lambda e: dict(changes=dict(classes=mask_class_names()[::-1])),
                          "damaged or edited since it was exported (classes do not match its content hash)"),
    "the flip set inside": (lambda e: dict(changes=dict(tta=True)),
                            "damaged or edited since it was exported (tta do not match its content hash)"),
    "another graph under its metadata": (lambda e: dict(graph=e["flip"]),
                                         "damaged or edited since it was exported (the graph do not match its content hash)"),
    "its format lowered": (lambda e: dict(changes=dict(imgcls_format=1)),
                           "damaged or edited since it was exported (imgcls_format do not match its content hash)"),
    "its hash removed": (lambda e: dict(drop=[onnxfile.HASH_KEY]), "metadata format 2 without its content hash (imgcls_hash "
                                                                   "removed?): refused, as an edited file would be; export it again"),
    "exported before hashes": (lambda e: dict(changes=dict(imgcls_format=1), drop=[onnxfile.HASH_KEY]),
                               "exported before files carried a content hash (metadata format 1, no imgcls_hash): export it "
                               "again with imgcls-export"),
}


@pytest.mark.parametrize("case", list(EDITED))
def test_an_edited_or_swapped_file_is_refused_naming_what_changed(case, exported, demo_dir, tmp_path, capsys):
    edit, expected = EDITED[case]
    path = with_metadata(exported["plain"], tmp_path / "m.onnx", **edit(exported))
    assert refused_by_inference(path, demo_dir, tmp_path, capsys) == f"{path}: {expected}"


BROKEN = {  # -> (the edit, what the line says with the hash recomputed over it): tracebacks, or a numpy broadcast error
    "inputs at another size": (lambda e: dict(changes=dict(inputs={"image": [64, 64]})),
                               "its graph's input image takes uint8 N x 3 x 64 x 48, its metadata says uint8 N x 3 x 64 x 64"),
    "inputs renamed": (lambda e: dict(changes=dict(inputs={"img": [64, 48]})), "its graph's inputs (image) are not its metadata's (img)"),
    "output removed": (lambda e: dict(drop=["output"]), "its metadata has no output (edited?)"),
    "inputs removed": (lambda e: dict(drop=["inputs"]), "its metadata has no inputs (edited?)"),
    "output renamed": (lambda e: dict(changes=dict(output="logits")), "its graph has no output logits (it answers probs)"),
    "format as text": (lambda e: dict(changes=dict(imgcls_format="1")), 'its metadata format "1" is not a whole number (edited?)'),
    "classes as a number": (lambda e: dict(changes=dict(classes=18)),
                            "its metadata's classes is not a list of distinct class names (it is 18)"),
    "17 classes": (lambda e: dict(changes=dict(classes=mask_class_names()[:17])),
                   "its graph answers 18 probabilities per image, its metadata names 17 classes"),
    "a 5-class graph": (lambda e: dict(graph=e["five"]), "its graph answers 5 probabilities per image, its metadata names 18 classes"),
    "tta as text": (lambda e: dict(changes=dict(tta="yes")), 'its metadata\'s tta is not true or false (it is "yes")'),
}


@pytest.mark.parametrize("rehash", [False, True], ids=["its hash as exported", "its hash recomputed"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_a_file_that_does_not_fit_its_metadata_is_one_line_naming_the_problem(case, rehash, exported, demo_dir, tmp_path, capsys):
    edit, expected = BROKEN[case]
    path = with_metadata(exported["plain"], tmp_path / "m.onnx", rehash=rehash, **edit(exported))
    line = refused_by_inference(path, demo_dir, tmp_path, capsys)
    if rehash or case == "format as text":  # the format is read first: it says how the rest is checked
        assert line == f"{path}: {expected}"
    else:
        assert line.startswith(f"{path}: damaged or edited since it was exported (") and line.endswith(" do not match its content hash)")


def test_an_entry_given_twice_is_refused(exported, tmp_path):
    path = with_metadata(exported["plain"], tmp_path / "m.onnx")
    model = onnx.load(str(path))
    model.metadata_props.add(key="classes", value=json.dumps(mask_class_names()[::-1]))  # a reader keeps one or the other
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="m.onnx: its metadata holds classes twice"):
        onnxfile.read_meta(path)


def test_a_genuine_file_reads_and_its_hash_covers_the_graph_and_every_entry(exported):
    meta = onnxfile.read_meta(exported["plain"])
    assert meta["imgcls_format"] == onnxfile.FORMAT == 2
    assert set(meta[onnxfile.HASH_KEY]["metadata"]) == set(meta) - {onnxfile.HASH_KEY}
    assert meta[onnxfile.HASH_KEY] == onnxfile.content_hash(onnx.load(str(exported["plain"])))


def test_a_checkpoint_edited_with_its_format_lowered_is_refused(checkpoints, demo_dir, tmp_path, capsys):
    ckpt = torch.load(checkpoints["BaseModel"], weights_only=True)
    ckpt["classes"][:2] = ckpt["classes"][1::-1]
    path = tmp_path / "edited.pth"
    torch.save(dict(ckpt, format=1), path)  # a lower format skipped the check, with the hash still in the file
    expected = f"checkpoint {path}: damaged or edited since it was saved (classes, format do not match its content hash)\n"
    assert run_cli(export.cli, capsys, path, "--out", tmp_path / "m.onnx") == (1, "", f"export.py: error: {expected}")
    assert refused_by_inference(path, demo_dir, tmp_path, capsys) + "\n" == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.pth"]


# ----------------------------------------------------------------------------- stopped by a signal
SLOW_CHECK = """import sys, time
from training import onnxfile
def slow(*args, **kwargs):  # the graph is written, the check has not run: where SIGTERM left the temp file behind
    print("checking", flush=True)
    time.sleep(120)
onnxfile.check_against_torch = slow
from baseline import export
sys.exit(export.cli(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_an_export_leaves_no_file_and_says_so_in_one_line(signum, checkpoints, tmp_path):
    out = tmp_path / "out" / "vote.onnx"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHECK, *map(str, checkpoints.values()), "--out", str(out)], cwd=ROOT,
                            env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "checking\n", proc.stderr.read()
        assert (out.parent / ".vote.onnx.tmp").is_file()  # the four models' graph, complete and unchecked
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (130, "export.py: interrupted: no file was left half-written\n")
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------- a finalize run's fold replaced
@pytest.mark.slow
@pytest.mark.parametrize("planned", [True, False], ids=["configs in the report", "a report without them"])
def test_a_fold_that_finalize_did_not_vote_is_refused(planned, fold_runs, tmp_path, capsys):
    run_dir = tmp_path / "finalize"
    shutil.copytree(fold_runs, run_dir)
    report = dict(rank_and_vote(run_dir, [Finalist(name, {}) for name in FINALISTS], 2, "winner"), experiment="test")
    if planned:  # what finalize's plan holds (these folds trained under --name fold<i>: fold0's, whose file is swapped)
        report["finalists"] = [dict(row, config=ran_configuration(run_dir / row["name"] / "fold0")) for row in report["finalists"]]
    write_report(run_dir, report)
    winner = report["winner"]
    other = next(name for name in FINALISTS if name != winner)
    target = run_dir / winner / "fold0" / "best.pth"
    shutil.copy(run_dir / other / "fold0" / "best.pth", target)  # another finalist's fold, under the winner's name
    code, out, err = run_cli(export.cli, capsys, run_dir, "--select", "winner")
    assert (code, out) == (1, "") and len(err.splitlines()) == 1, err
    assert err.startswith(f"export.py: error: {target}: trained with another command than {winner}'s plan (--"), err
    assert err.endswith("finalize did not vote it (put its own fold back, or run finalize again)\n")
    shutil.copy(run_dir / winner / "fold1" / "best.pth", target)  # the winner's other fold
    assert run_cli(export.cli, capsys, run_dir, "--select", "winner") == (
        1, "", f"export.py: error: {target}: trained as fold 1 of 2, not as {winner}'s fold 0 of 2: finalize did not vote it "
               f"(put its own fold back, or run finalize again)\n")
    assert not (run_dir / "winner.onnx").exists()
