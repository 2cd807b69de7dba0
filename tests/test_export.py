"""baseline/export.py and training/onnxfile.py: the exported file predicts as PyTorch does on the demo's real images
(one model of each kind, a vote, the flip), carries its metadata, runs in inference.py like a checkpoint, and a
finalize run's selection exported as one file reproduces its submission_soft.csv."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import model
from baseline import export, inference
from conftest import FINALISTS, read_csv, run_cli
from core.labels import mask_class_names
from search.finalists import Finalist
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
