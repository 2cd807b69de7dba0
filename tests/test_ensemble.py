"""baseline/ensemble.py: soft and hard voting over real CSV files in the formats train.py writes."""
import csv
import subprocess
import sys

import numpy as np
import pytest

from baseline import ensemble
from conftest import ROOT, read_csv, run_cli, train_env
from core.labels import mask_class_names

CLASSES = mask_class_names()
IDS = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]



def write_soft(path, ids, probs, classes=CLASSES):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", *classes])
        w.writerows([[i, *(f"{p:.6f}" for p in row)] for i, row in zip(ids, probs)])
    return path


def write_hard(path, ids, answers):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["ImageID", "ans"], *zip(ids, answers)])
    return path


def random_probs(seed, n=len(IDS), c=len(CLASSES)):
    p = np.random.default_rng(seed).random((n, c)) ** 4
    return p / p.sum(1, keepdims=True)


def soft_of(path):
    rows = read_csv(path)
    return [r["ImageID"] for r in rows], np.array([[float(r[c]) for c in list(rows[0])[1:]] for r in rows])



def test_soft_vote_aligns_rows_and_columns_by_name(tmp_path, capsys):
    p1, p2 = random_probs(1), random_probs(2)
    a = write_soft(tmp_path / "a" / "submission_soft.csv", IDS, p1)
    # the second file lists the images in another order and the classes in another order: both are named, so harmless
    rows, cols = [2, 0, 3, 1], list(reversed(range(len(CLASSES))))
    b = write_soft(tmp_path / "b" / "submission_soft.csv", [IDS[i] for i in rows], p2[rows][:, cols], [CLASSES[j] for j in cols])
    code, out, err = run_cli(ensemble.cli, capsys, a, b, "--out", tmp_path / "ens")
    assert code == 0 and err == "" and "soft vote of 2 files" in out
    ids, probs = soft_of(tmp_path / "ens" / "submission_soft.csv")
    assert ids == IDS and list(read_csv(tmp_path / "ens" / "submission_soft.csv")[0])[1:] == CLASSES
    assert np.allclose(probs, (p1 + p2) / 2, atol=2e-6)
    sub = read_csv(tmp_path / "ens" / "submission.csv")
    assert [r["ImageID"] for r in sub] == IDS
    assert [int(r["ans"]) for r in sub] == ((p1 + p2) / 2).argmax(1).tolist()  # mask layout: class index


def test_columns_in_another_order_vote_as_class_numbers(tmp_path, capsys):
    """The first input's columns in another order: the answers are still the mask classes' numbers, by name
    (they were the class names once, and that submission.csv scored 0)."""
    probs = random_probs(3)
    cols = np.random.default_rng(4).permutation(len(CLASSES))
    a = write_soft(tmp_path / "a" / "submission_soft.csv", IDS, probs[:, cols], [CLASSES[j] for j in cols])
    b = write_soft(tmp_path / "b" / "submission_soft.csv", IDS, probs)
    code, _, err = run_cli(ensemble.cli, capsys, a, b, "--out", tmp_path / "ens")
    assert code == 0, err
    assert [r["ans"] for r in read_csv(tmp_path / "ens" / "submission.csv")] == [str(i) for i in probs.argmax(1)]
    assert list(read_csv(tmp_path / "ens" / "submission_soft.csv")[0])[1:] == CLASSES
    assert np.allclose(soft_of(tmp_path / "ens" / "submission_soft.csv")[1], probs, atol=2e-6)


def test_soft_vote_weights(tmp_path, capsys):
    probs = [random_probs(s) for s in (3, 4, 5)]
    files = [write_soft(tmp_path / f"m{i}" / "submission_soft.csv", IDS, p) for i, p in enumerate(probs)]
    code, out, _ = run_cli(ensemble.cli, capsys, *files, "--weights", 2, 1, 0, "--out", tmp_path / "ens")
    assert code == 0 and "weights 2 1 0" in out
    assert np.allclose(soft_of(tmp_path / "ens" / "submission_soft.csv")[1], (2 * probs[0] + probs[1]) / 3, atol=2e-6)


def test_folder_layout_answers_are_class_names(tmp_path, capsys):
    classes = ["2", "10", "green", "red"]
    p1, p2 = random_probs(6, c=4), random_probs(7, c=4)
    files = [write_soft(tmp_path / n / "submission_soft.csv", ["x/1.png", "y.png", "z.png", "w.png"], p, classes)
             for n, p in (("a", p1), ("b", p2))]
    assert run_cli(ensemble.cli, capsys, *files, "--out", tmp_path / "ens")[0] == 0
    answers = [r["ans"] for r in read_csv(tmp_path / "ens" / "submission.csv")]
    assert answers == [classes[i] for i in (p1 + p2).argmax(1)]


def test_hard_vote_majority_and_tie_breaks(tmp_path, capsys):
    # image a: 2 votes against 1 -> 3; b: all agree -> 7; c and d: three-way ties
    votes = [["3", "7", "1", "4"], ["3", "7", "2", "5"], ["9", "7", "0", "6"]]
    files = [write_hard(tmp_path / f"m{i}" / "submission.csv", IDS, v) for i, v in enumerate(votes)]

    # no soft CSVs beside them: a tie goes to the earliest file
    code, out, err = run_cli(ensemble.cli, capsys, "--method", "hard", *files, "--out", tmp_path / "plain")
    assert code == 0 and err == "" and "2 ties broken by the earliest file" in out
    assert [r["ans"] for r in read_csv(tmp_path / "plain" / "submission.csv")] == ["3", "7", "1", "4"]
    assert not (tmp_path / "plain" / "submission_soft.csv").exists()

    # soft CSVs beside them: the tied answer with the highest summed probability wins
    probs = np.full((3, 4, 18), 0.01)
    probs[1, 2, 2] = 0.6  # image c: model 1 is sure of its class 2; the others are lukewarm about theirs
    probs[0, 2, 1] = probs[2, 2, 0] = 0.3
    probs[:, 3, 4] = probs[:, 3, 5] = probs[:, 3, 6] = 0.2  # image d: exactly tied mass -> still the earliest file
    probs /= probs.sum(-1, keepdims=True)  # probabilities: each image's row sums to 1
    for i in range(3):
        write_soft(tmp_path / f"m{i}" / "submission_soft.csv", IDS, probs[i])
    code, out, _ = run_cli(ensemble.cli, capsys, "--method", "hard", *files, "--out", tmp_path / "soft")
    assert code == 0 and "2 ties broken by probabilities from 3 soft CSVs" in out
    assert [r["ans"] for r in read_csv(tmp_path / "soft" / "submission.csv")] == ["3", "7", "2", "4"]


def test_hard_vote_folder_names_with_soft_tie_break(tmp_path, capsys):
    classes = ["2", "10", "cat"]
    votes = [["cat", "10"], ["2", "2"]]
    soft = [np.array([[0.1, 0.1, 0.8], [0.25, 0.5, 0.25]]), np.array([[0.5, 0.4, 0.1], [0.5, 0.25, 0.25]])]
    files = []
    for i in range(2):
        files.append(write_hard(tmp_path / f"m{i}" / "submission.csv", ["p.png", "q.png"], votes[i]))
        # the soft CSV lists the images in another order: aligned by ImageID
        write_soft(tmp_path / f"m{i}" / "submission_soft.csv", ["q.png", "p.png"], soft[i][::-1], classes)
    assert run_cli(ensemble.cli, capsys, "--method", "hard", *files, "--out", tmp_path / "ens")[0] == 0
    # p: cat 0.9 vs "2" 0.6 -> cat; q: "10" 0.75 vs "2" 0.75 -> the earliest file's "10"
    assert [r["ans"] for r in read_csv(tmp_path / "ens" / "submission.csv")] == ["cat", "10"]


def soft_pair(tmp_path, second_ids=IDS, second_classes=CLASSES):
    a = write_soft(tmp_path / "a" / "submission_soft.csv", IDS, random_probs(1))
    b = write_soft(tmp_path / "b" / "submission_soft.csv", second_ids, random_probs(2, n=len(second_ids), c=len(second_classes)),
                   second_classes)
    return [a, b]


def hard_pair(tmp_path, second_ids):
    return [write_hard(tmp_path / "a" / "submission.csv", IDS, ["1"] * 4),
            write_hard(tmp_path / "b" / "submission.csv", second_ids, ["2"] * len(second_ids))]


def corrupt(files, value):
    """The second file's first probability for image b.jpg -> value."""
    lines = files[1].read_text().splitlines()
    cells = lines[2].split(",")
    lines[2] = ",".join([cells[0], value, *cells[2:]])
    files[1].write_text("\n".join(lines) + "\n")
    return files


REFUSALS = {
    "soft: an image missing": (lambda t: soft_pair(t, IDS[:3]), "list different images: 1 of"),
    "soft: another image": (lambda t: soft_pair(t, IDS[:3] + ["zzz.jpg"]), "1 not in"),
    "soft: other classes": (lambda t: soft_pair(t, second_classes=CLASSES[:17] + ["mystery"]),
                            "not the 18 mask classes: missing not_worn_female_old; unknown mystery"),
    "soft: fewer classes": (lambda t: soft_pair(t, second_classes=CLASSES[:4]), "missing wear_female_middle, wear_female_old"),
    "soft: first file misses a class": (lambda t: soft_pair(t, second_classes=CLASSES[:4])[::-1], "missing wear_female_middle"),
    "soft: folder classes differ": (lambda t: [write_soft(t / "a" / "submission_soft.csv", IDS, random_probs(1, c=2), ["cat", "dog"]),
                                               write_soft(t / "b" / "submission_soft.csv", IDS, random_probs(2, c=2), ["cat", "owl"])],
                                    "different classes: 2 vs 2, only in"),
    "soft: given a submission.csv": (lambda t: [soft_pair(t)[0], hard_pair(t, IDS)[1]], "no class probability columns"),
    "soft: weights count": (lambda t: soft_pair(t) + ["--weights", "1"], "--weights: need 2"),
    "soft: negative weight": (lambda t: soft_pair(t) + ["--weights", "1", "-1"], "non-negative"),
    "soft: not a number": (lambda t: corrupt(soft_pair(t), "x.5"), "'x.5' in column wear_male_young (image b.jpg) is not a probability"),
    "soft: a logit": (lambda t: corrupt(soft_pair(t), "-3.2"), "'-3.2' in column wear_male_young (image b.jpg) is not a probability"),
    "soft: a row of zeros": (lambda t: [soft_pair(t)[0], write_soft(t / "z" / "submission_soft.csv", IDS, np.zeros((4, 18)))],
                             "the probabilities of image a.jpg sum to 0, not 1 (4 of 4 rows)"),
    "soft: a row of ones": (lambda t: [soft_pair(t)[0], write_soft(t / "o" / "submission_soft.csv", IDS, np.ones((4, 18)))],
                            "the probabilities of image a.jpg sum to 18, not 1 (4 of 4 rows)"),
    "soft: a formula for a class": (lambda t: [write_soft(t / f / "submission_soft.csv", IDS, random_probs(1, c=2),
                                                          ["=cmd|' /C calc'!A0", "dog"]) for f in "ab"],
                                    "column \"=cmd|' /C calc'!A0\" is no class name (it starts as a spreadsheet formula)"),
    "hard: a formula for an answer": (lambda t: ["--method", "hard", *hard_pair(t, IDS)[:1],
                                                 write_hard(t / "f" / "submission.csv", IDS, ["@SUM(1+1)*cmd|' /C calc'!A0"] * 4)],
                                      "answer \"@SUM(1+1)*cmd|' /C calc'!A0\" is no class (it starts as a spreadsheet formula)"),
    "hard: different images": (lambda t: ["--method", "hard", *hard_pair(t, IDS[1:] + ["e.jpg"])], "list different images"),
    "hard: duplicated image": (lambda t: ["--method", "hard", *hard_pair(t, IDS + ["a.jpg"])], "a.jpg is listed more than once"),
    "hard: given a soft CSV": (lambda t: ["--method", "hard", *soft_pair(t)], "no ans column"),
    "hard: weights": (lambda t: ["--method", "hard", *hard_pair(t, IDS), "--weights", "1", "2"], "soft voting only"),
    "missing file": (lambda t: [soft_pair(t)[0], t / "nowhere.csv"], "nowhere.csv: no such file"),
    "unknown method": (lambda t: ["--method", "median", *soft_pair(t)], "'median'"),
    "soft: one file twice": (lambda t: [*soft_pair(t), soft_pair(t)[0]], "submission_soft.csv are the same file: it would vote twice"),
    "soft: one file by two paths": (lambda t: [soft_pair(t)[0], t / "b" / ".." / "a" / "submission_soft.csv"], "are the same file"),
    "hard: one file twice": (lambda t: ["--method", "hard", *hard_pair(t, IDS), hard_pair(t, IDS)[1]], "are the same file"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    make, expected = REFUSALS[case]
    code, out, err = run_cli(ensemble.cli, capsys, *make(tmp_path), "--out", tmp_path / "ens")
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ensemble.py: error:") and expected in lines[0], err
    assert not (tmp_path / "ens").exists()


@pytest.mark.parametrize("method", ["soft", "hard"])
def test_out_where_an_input_lives_is_refused(tmp_path, capsys, method):
    # --out runs/exp with runs/exp/submission_soft.csv as an input overwrote that input with the ensemble
    files = soft_pair(tmp_path) if method == "soft" else hard_pair(tmp_path, IDS)
    before = files[1].read_bytes()
    code, out, err = run_cli(ensemble.cli, capsys, "--method", method, *files, "--out", tmp_path / "b" / ".")
    assert code == 1 and out == ""
    assert err == f"ensemble.py: error: --out {tmp_path / 'b'} holds the input {files[1]}: the ensemble's submission files " \
                  f"would overwrite it or its run's; write them elsewhere\n"
    assert files[1].read_bytes() == before and [p.name for p in files[1].parent.iterdir()] == [files[1].name]


def test_a_csv_saved_by_excel_with_a_bom_is_read(tmp_path, capsys):
    files = soft_pair(tmp_path)
    files[1].write_bytes(b"\xef\xbb\xbf" + files[1].read_bytes())
    code, _, err = run_cli(ensemble.cli, capsys, *files, "--out", tmp_path / "ens")
    assert code == 0, err


def test_script_runs(tmp_path):
    files = soft_pair(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "baseline" / "ensemble.py"), *map(str, files), "--out", str(tmp_path / "ens")],
                          cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ens" / "submission.csv").is_file() and (tmp_path / "ens" / "submission_soft.csv").is_file()
    proc = subprocess.run([sys.executable, str(ROOT / "baseline" / "ensemble.py"), str(files[0]), str(tmp_path / "none.csv"),
                           "--out", str(tmp_path / "ens2")], cwd=tmp_path, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == f"ensemble.py: error: {tmp_path / 'none.csv'}: no such file\n"
