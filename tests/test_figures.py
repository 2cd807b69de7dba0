"""core/figures.py: the pictures drawn with PIL."""
import numpy as np
import pytest

from core import figures


@pytest.mark.parametrize("classes", [["cat", "dog"], list(range(18)), [f"class_{i}" for i in range(40)]])
def test_confusion_image_fits_its_title_and_shades_by_count(classes):
    n = len(classes)
    matrix = np.zeros((n, n), dtype=np.int64)
    matrix[0, 0], matrix[n - 1, 0] = 9, 1
    title = "a long title: runs/pred/submission.csv macro F1 0.8123"
    image = figures.confusion_image(matrix, classes, title=title)
    assert image.mode == "RGB" and image.height > 30 * n
    title_band = np.asarray(image)[:18]
    assert (title_band < 128).any() and (title_band[:, :5] == 255).all() and (title_band[:, -5:] == 255).all()
    colours = {tuple(p) for p in np.asarray(image).reshape(-1, 3)}
    assert (8, 48, 107) in colours and (247, 251, 255) in colours  # the peak count darkest blue, empty cells near white


def test_prediction_grid_colours_right_and_wrong():
    images = [np.full((20, 16, 3), 40 * i, dtype=np.uint8) for i in range(6)]
    grid = figures.prediction_grid(images, preds=[0, 1, 1, 0, 1, 0], labels=[0, 1, 0, 0, 1, 1], classes=["cat", "dog"])
    pixels = {tuple(p) for p in np.asarray(grid).reshape(-1, 3)}
    assert grid.mode == "RGB" and grid.width >= 4 * 16 and grid.height >= 2 * (20 + 30)  # 4 columns, 2 rows
    assert (0, 128, 0) in pixels and (200, 0, 0) in pixels  # green titles where right, red where wrong
    assert (np.asarray(grid)[30:50] == 0).all(axis=-1).any()  # the first image (black) is pasted under its title


FIGURE_MEMORY = """
import resource, sys
import numpy as np
from core import figures
n = int(sys.argv[1])
truth = np.repeat(np.arange(n), 2)
preds = np.where(np.arange(2 * n) % 3 == 0, (truth * 7 + 1) % n, truth)
matrix = np.zeros((n, n), dtype=np.int64)
np.add.at(matrix, (truth, preds), 1)
with open("/proc/self/statm") as f:
    mapped = int(f.read().split()[0]) * resource.getpagesize()
# a safety net, not the measure: without the cap the picture asks for gigabytes, and must fail fast, not swap
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, resource.RLIM_INFINITY))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = np.asarray(figures.confusion_image(matrix, [f"class_{i}" for i in range(n)]))  # as train.py hands it to TensorBoard
print(image.shape[0], image.shape[1], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_confusion_image_memory_is_bounded_whatever_the_class_count():
    # 2,000 classes made a 60,000 px square picture: 23 GB of RSS at the end of a run
    import subprocess
    import sys

    from conftest import ROOT, train_env
    proc = subprocess.run([sys.executable, "-c", FIGURE_MEMORY, "2000"], cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    height, width, peak_mib = map(int, proc.stdout.split())
    assert height <= 2000 and width <= 2000 and peak_mib < 64


def test_many_classes_show_the_most_confused():
    n = 300
    matrix = np.diag(np.full(n, 5))
    matrix[123, 45], matrix[7, 299], matrix[200, 200] = 9, 2, 50
    picked = figures.most_confused(matrix, k=4)
    assert {123, 45, 7, 299} == set(picked.tolist()) and list(picked) == sorted(picked)
    assert list(figures.most_confused(matrix[:18, :18])) == list(range(18))  # the mask layout: every class
    image = figures.confusion_image(matrix, [f"a class with a very long name, number {i}" for i in range(n)])
    assert max(image.size) < 30 * figures.MAX_CELLS + 400


def test_prediction_grid_with_long_class_names_stays_small():
    images = [np.zeros((20, 16, 3), dtype=np.uint8)] * 4
    grid = figures.prediction_grid(images, [0, 1, 0, 1], [0, 1, 1, 0], ["x" * 500, "y" * 500])
    assert grid.width < 4 * 300
