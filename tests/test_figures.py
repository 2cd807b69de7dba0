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
