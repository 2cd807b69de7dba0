"""core/demo.py: the deterministic demo data, made once at the default path."""
import numpy as np
import pytest
from PIL import Image

from conftest import read_csv
from core import demo
from core.labels import age_band, decode_class
from imagedata.layouts import read_eval, read_mask_train


def test_demo_data_deterministic_and_complete(tmp_path, demo_dir):
    again = demo.make_demo_data(tmp_path / "demo", profiles=24, eval_profiles=2, size=(64, 48), seed=1)
    first, second = read_mask_train(demo_dir / "train"), read_mask_train(again / "train")
    assert np.array_equal(first["labels"], second["labels"])
    a = np.asarray(Image.open(first["paths"][10]))
    b = np.asarray(Image.open(second["paths"][10]))
    assert np.array_equal(a, b)
    assert len(set(first["strata"].tolist())) >= 4  # gender x age band mixed
    truth = (demo_dir / "eval" / "truth.csv").read_text().split()[1:]
    assert len(truth) == len(read_eval(demo_dir / "eval", "mask")[0]) == 14


def test_demo_data_made_once_at_default_path_with_a_line(tmp_path, capsys):
    root = tmp_path / "data" / "demo"
    demo.ensure_demo_data(root, profiles=3, eval_profiles=1, size=(32, 24))
    assert "making demo data" in capsys.readouterr().out
    assert len(read_mask_train(root / "train")["paths"]) == 21
    demo.ensure_demo_data(root, profiles=3, eval_profiles=1, size=(32, 24))
    assert capsys.readouterr().out == ""
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def shares(values, n):
    return np.bincount(np.asarray(values), minlength=n) / len(values)


@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_demo_people_have_the_competitions_shares_at_any_size(n):
    genders, ages = np.array(demo.people(np.random.default_rng(0), n)).T
    assert len(genders) == n
    assert abs(genders.sum() - 0.61 * n) < 1  # women
    assert np.abs(np.bincount([age_band(a) for a in ages], minlength=3) - np.array([0.47, 0.46, 0.07]) * n).max() < 1
    assert ages.min() >= 18 and ages.max() <= 60  # ages stop at 60: the old band is only 60-year-olds


def test_demo_train_and_eval_follow_the_same_distribution(tmp_path):
    root = demo.make_demo_data(tmp_path / "demo", profiles=150, eval_profiles=60, size=(32, 24), seed=3)
    train_labels = read_mask_train(root / "train")["labels"]
    truth = np.array([int(row["ans"]) for row in read_csv(root / "eval" / "truth.csv")])
    for labels in (train_labels, truth):
        mask, gender, band = decode_class(labels)
        assert shares(mask, 3) == pytest.approx([5 / 7, 1 / 7, 1 / 7], abs=0.01)
        assert shares(gender, 2)[1] == pytest.approx(0.61, abs=0.01)
        assert shares(band, 3) == pytest.approx([0.47, 0.46, 0.07], abs=0.01)
    # several of the 18 classes hold about 1% of the images, as in the competition
    assert (shares(train_labels, 18) < 0.02).sum() >= 4
