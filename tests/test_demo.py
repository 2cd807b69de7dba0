"""core/demo.py: the deterministic demo data, made once at the default path."""
import numpy as np
from PIL import Image

import dataset
from core import demo


def test_demo_data_deterministic_and_complete(tmp_path, demo_dir):
    again = demo.make_demo_data(tmp_path / "demo", profiles=24, eval_profiles=2, size=(64, 48), seed=1)
    first, second = dataset.read_mask_train(demo_dir / "train"), dataset.read_mask_train(again / "train")
    assert np.array_equal(first["labels"], second["labels"])
    a = np.asarray(Image.open(first["paths"][10]))
    b = np.asarray(Image.open(second["paths"][10]))
    assert np.array_equal(a, b)
    assert len(set(first["strata"].tolist())) >= 4  # gender x age band mixed
    truth = (demo_dir / "eval" / "truth.csv").read_text().split()[1:]
    assert len(truth) == len(dataset.read_eval(demo_dir / "eval", "mask")[0]) == 14


def test_demo_data_made_once_at_default_path_with_a_line(tmp_path, capsys):
    root = tmp_path / "data" / "demo"
    demo.ensure_demo_data(root, profiles=3, eval_profiles=1, size=(32, 24))
    assert "making demo data" in capsys.readouterr().out
    assert len(dataset.read_mask_train(root / "train")["paths"]) == 21
    demo.ensure_demo_data(root, profiles=3, eval_profiles=1, size=(32, 24))
    assert capsys.readouterr().out == ""
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
