"""baseline/evaluation.py: scores checked against sklearn on real CSV files, refusals, the picture."""
import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from baseline import evaluation
from conftest import ROOT, run_cli, train_env
from core.labels import decode_class, mask_class_names


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path



@pytest.fixture
def mask_case(tmp_path):
    """54 images (3 per class); predictions right 2/3 of the time, wrong in a way that moves each task."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(18), 3)
    preds = labels.copy()
    wrong = rng.choice(len(labels), 18, replace=False)
    preds[wrong] = rng.integers(0, 18, len(wrong))
    ids = [f"{i:03d}.jpg" for i in range(len(labels))]
    order = rng.permutation(len(labels))  # the submission lists the images in another order
    truth = write_csv(tmp_path / "truth.csv", ["ImageID", "ans"], zip(ids, labels))
    sub = write_csv(tmp_path / "sub" / "submission.csv", ["ImageID", "ans"], [(ids[i], preds[i]) for i in order])
    return truth, sub, labels, preds, ids, order


def test_scores_match_sklearn_per_task(mask_case, capsys, tmp_path):
    truth, sub, labels, preds, _, _ = mask_case
    result = evaluation.evaluate(sub, truth, "mask")
    s = result["scores"]
    assert s["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert s["f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    for task, t_true, t_pred in zip(("mask", "gender", "age"), decode_class(labels), decode_class(preds)):
        assert s[f"{task}_accuracy"] == pytest.approx(accuracy_score(t_true, t_pred))
        assert s[f"{task}_f1"] == pytest.approx(f1_score(t_true, t_pred, average="macro"))
    assert result["matrix"].sum() == 54 and np.trace(result["matrix"]) == (labels == preds).sum()

    code, out, err = run_cli(evaluation.cli, capsys, sub, "--truth", truth, "--layout", "mask", "--plot", tmp_path / "plots" / "cm.png")
    assert code == 0 and err == ""
    assert "54 images, 18 classes" in out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:6]}
    assert set(table) == {"all", "mask", "gender", "age"}
    assert float(table["all"][1]) == pytest.approx(s["f1"], abs=5e-5)
    assert float(table["age"][0]) == pytest.approx(s["age_accuracy"], abs=5e-5)
    assert "confusion matrix" in out and " 0 wear_male_young" in out and "17 not_worn_female_old" in out
    png = Image.open(tmp_path / "plots" / "cm.png")
    assert png.format == "PNG" and min(png.size) > 500


def test_soft_submission_scores_by_argmax(mask_case, capsys):
    truth, _, labels, preds, ids, order = mask_case
    probs = np.full((len(ids), 18), 0.01)
    probs[np.arange(len(ids)), preds] = 0.83
    soft = write_csv(truth.parent / "soft.csv", ["ImageID", *mask_class_names()], [(ids[i], *probs[i]) for i in order])
    assert evaluation.evaluate(soft, truth)["scores"]["f1"] == pytest.approx(f1_score(labels, preds, average="macro"))


def soft_variant(mask_case, columns):
    """The mask case's predictions as a soft CSV with these columns (class names), probabilities by name."""
    truth, _, labels, preds, ids, order = mask_case
    names = mask_class_names()
    rows = [(ids[i], *[0.9 if c == names[preds[i]] else 0.1 / 17 for c in columns]) for i in order]
    return write_csv(truth.parent / "variant" / "submission_soft.csv", ["ImageID", *columns], rows)


def test_soft_columns_are_read_by_class_name(mask_case):
    """The same 18 columns in another order score the same (they scored 0.0000 by position)."""
    truth, _, labels, preds, _, _ = mask_case
    shuffled = list(np.random.default_rng(1).permutation(mask_class_names()))
    result = evaluation.evaluate(soft_variant(mask_case, shuffled), truth)
    assert result["scores"]["f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert result["classes"] == mask_class_names()


@pytest.mark.parametrize("change, message", [
    ("missing", "its probability columns are not the 18 mask classes: missing wear_male_middle"),
    ("extra", "its probability columns are not the 18 mask classes: unknown mystery"),
])
def test_soft_columns_missing_or_unknown_class_refused(mask_case, capsys, change, message):
    """One column missing scored 0.4857 (every class shifted by one), an extra one 0.3714: now one line."""
    names = mask_class_names()
    columns = [c for c in names if c != "wear_male_middle"] if change == "missing" else [*names, "mystery"]
    soft = soft_variant(mask_case, columns)
    code, out, err = run_cli(evaluation.cli, capsys, soft, "--truth", mask_case[0])
    assert code == 1 and out == "" and err.splitlines() == [f"evaluation.py: error: {soft}: {message}"]


def test_folder_layout_class_names(tmp_path, capsys):
    # class names that look like numbers: --layout folder reads them as names, in natural order
    truth = write_csv(tmp_path / "truth.csv", ["ImageID", "ans"], [("a.png", "2"), ("b/c.png", "10"), ("d.png", "2"), ("e.png", "10")])
    sub = write_csv(tmp_path / "p" / "submission.csv", ["ImageID", "ans"],
                    [("e.png", "10"), ("d.png", "10"), ("b/c.png", "10"), ("a.png", "2")])
    code, out, err = run_cli(evaluation.cli, capsys, sub, "--truth", truth, "--layout", "folder")
    assert code == 0, err
    assert "4 images, 2 classes" in out and "mask" not in out
    result = evaluation.evaluate(sub, truth, "folder")
    assert result["classes"] == ["2", "10"] and result["matrix"].tolist() == [[1, 1], [0, 2]]
    assert result["scores"]["accuracy"] == pytest.approx(0.75)
    assert result["scores"]["f1"] == pytest.approx(f1_score(["2", "10", "2", "10"], ["2", "10", "10", "10"], average="macro"))
    assert len(evaluation.evaluate(sub, truth, "mask")["classes"]) == 18
    with pytest.raises(ValueError, match="say --layout mask"):  # auto: "2", "10" may be mask indices or class names
        evaluation.evaluate(sub, truth)
    # with the soft CSV beside the submission its columns name the classes, even ones nobody predicted or labelled
    write_csv(tmp_path / "p" / "submission_soft.csv", ["ImageID", "2", "10", "cat", "dog"],
              [(i, 0.25, 0.25, 0.25, 0.25) for i in ("a.png", "b/c.png", "d.png", "e.png")])
    result = evaluation.evaluate(sub, truth)
    assert result["classes"] == ["2", "10", "cat", "dog"] and result["matrix"].shape == (4, 4)


def refuse_case(tmp_path, truth_rows, sub_rows, soft=None, layout="auto"):
    truth = write_csv(tmp_path / "truth.csv", ["ImageID", "ans"], truth_rows)
    sub = write_csv(tmp_path / "sub.csv", ["ImageID", "ans"], sub_rows)
    if soft:
        write_csv(tmp_path / "sub_soft.csv", ["ImageID", *soft], [(r[0], *[1 / len(soft)] * len(soft)) for r in sub_rows])
    return [sub, "--truth", truth, "--layout", layout]


ROWS = [("a.jpg", "1"), ("b.jpg", "5"), ("c.jpg", "17")]
REFUSALS = {
    "an image missing": (lambda t: refuse_case(t, ROWS, ROWS[:2]), "list different images: 1 of"),
    "another image": (lambda t: refuse_case(t, ROWS, ROWS[:2] + [("z.jpg", "3")]), "1 not in"),
    "duplicated image": (lambda t: refuse_case(t, ROWS, ROWS + [("a.jpg", "2")]), "a.jpg is listed more than once"),
    "index out of range": (lambda t: refuse_case(t, ROWS, ROWS[:2] + [("c.jpg", "18")], layout="mask"),
                           "'18' is not a mask-layout class index"),
    "names in mask layout": (lambda t: refuse_case(t, ROWS, ROWS[:2] + [("c.jpg", "cat")], layout="mask"), "need --layout folder"),
    "integers without a layout": (lambda t: refuse_case(t, ROWS, ROWS), "say --layout mask"),
    "truth class unknown to the soft CSV": (
        lambda t: refuse_case(t, [("a.jpg", "cat"), ("b.jpg", "owl")], [("a.jpg", "cat"), ("b.jpg", "dog")], soft=["cat", "dog"]),
        "'owl' (image b.jpg) is neither"),
    "index for numeric class names": (lambda t: refuse_case(t, [("a.jpg", "1"), ("b.jpg", "2")], [("a.jpg", "1"), ("b.jpg", "0")],
                                                            soft=["1", "2"]), "'0' (image b.jpg) is neither"),
    "truth without ans": (lambda t: [write_csv(t / "s.csv", ["ImageID", "ans"], ROWS), "--truth",
                                     write_csv(t / "t.csv", ["ImageID", "label"], ROWS)], "no ans column"),
    "truth without ImageID": (lambda t: [write_csv(t / "s.csv", ["ImageID", "ans"], ROWS), "--truth",
                                         write_csv(t / "t.csv", ["Image", "ans"], ROWS)], "t.csv: no ImageID column"),
    "missing truth": (lambda t: [write_csv(t / "s.csv", ["ImageID", "ans"], ROWS), "--truth", t / "none.csv"], "none.csv: no such file"),
    "submission with a misnamed column": (lambda t: [write_csv(t / "s.csv", ["ImageID", "prediction"], ROWS), "--truth",
                                                     write_csv(t / "t.csv", ["ImageID", "ans"], ROWS)],
                                          "columns ImageID,prediction: expected ImageID,ans"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_is_one_line(case, tmp_path, capsys):
    make, expected = REFUSALS[case]
    args = make(tmp_path)
    code, out, err = run_cli(evaluation.cli, capsys, *args, "--plot", tmp_path / "cm.png")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluation.py: error:") and expected in lines[0], err
    assert not (tmp_path / "cm.png").exists()


def test_csvs_saved_by_excel_with_a_bom_are_read(mask_case, capsys):
    truth, sub, labels, preds, _, _ = mask_case
    for path in (truth, sub):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    code, out, err = run_cli(evaluation.cli, capsys, sub, "--truth", truth, "--layout", "mask")
    assert code == 0 and err == "" and "54 images, 18 classes" in out


def test_unwritable_plot_is_one_line(tmp_path, capsys):
    args = refuse_case(tmp_path, ROWS, ROWS, layout="mask")
    code, out, err = run_cli(evaluation.cli, capsys, *args, "--plot", "/proc/nni-test/cm.png")
    assert code == 1 and out == ""
    assert err.startswith("evaluation.py: error: --plot /proc/nni-test/cm.png: cannot write it") and err.count("\n") == 1, err


def test_script_runs(mask_case, tmp_path):
    truth, sub = mask_case[:2]
    proc = subprocess.run([sys.executable, str(ROOT / "baseline" / "evaluation.py"), str(sub), "--truth", str(truth), "--layout", "mask"],
                          cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "macro F1" in proc.stdout, proc.stderr
