"""Pictures of a run, drawn with PIL, not matplotlib: in milliseconds, where matplotlib's import and
layout took most of a second at the end of every trial. The confusion matrix (TensorBoard and
evaluation.py --plot) and the grid of validation images titled prediction / truth (TensorBoard)."""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_CELLS = 50   # classes drawn in the confusion matrix: at 30 px a cell, 2,000 classes made a 60,000 px square (10 GB)
MAX_NAME = 32    # characters of a class name drawn: a long one would widen the picture without bound


def short(name):
    name = str(name)
    return name if len(name) <= MAX_NAME else name[:MAX_NAME - 3] + "..."


def most_confused(matrix, k=MAX_CELLS):
    """Indices of the k classes with the most errors (their row's and column's counts off the diagonal), in
    class order: where a big matrix has something to show. All of them when there are k or fewer."""
    if len(matrix) <= k:
        return np.arange(len(matrix))
    errors = matrix.sum(0) + matrix.sum(1) - 2 * np.diag(matrix)
    return np.sort(np.argsort(-errors, kind="stable")[:k])


def confusion_image(matrix, classes, title="confusion matrix", cell=30):
    """The matrix as a heat map with its counts and the class names -> RGB PIL image. Past MAX_CELLS classes,
    the MAX_CELLS most confused ones, said in the title: the picture's size is bounded whatever the class count."""
    def vertical(text, font):
        strip = Image.new("RGB", (int(font.getlength(text)) + 4, 16), "white")
        ImageDraw.Draw(strip).text((2, 0), text, fill="black", font=font)
        return strip.rotate(90, expand=True)

    picked = most_confused(matrix)
    if len(picked) < len(classes):
        title = f"{title} ({len(picked)} most confused of {len(classes)} classes)"
    matrix = matrix[np.ix_(picked, picked)]
    font, small = ImageFont.load_default(size=12), ImageFont.load_default(size=11)
    n, names = len(picked), [short(classes[i]) for i in picked]
    label = int(max(font.getlength(c) for c in names)) + 10  # room for the longest class name
    left, top = label + 20, label + 40
    half = font.getlength(title) / 2
    width = max(left + n * cell + 10, int(2 * half) + 20)  # a long title over a few classes
    image = Image.new("RGB", (width, top + n * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    # over the matrix where it fits, else as near as the image allows
    draw.text((min(max(left + n * cell / 2, half + 10), width - half - 10), 4), title, fill="black", font=font, anchor="mt")
    draw.text((left + n * cell / 2, 20), "predicted", fill="black", font=small, anchor="mt")
    image.paste(vertical("true", small), (2, top + n * cell // 2))
    peak = max(int(matrix.max()), 1)
    for i, name in enumerate(names):
        draw.text((left - 6, top + i * cell + cell / 2), name, fill="black", font=font, anchor="rm")
        column = vertical(name, font)
        image.paste(column, (left + i * cell + (cell - column.width) // 2, top - 6 - column.height))
        for j in range(n):
            shade = int(matrix[i, j]) / peak  # white to dark blue, as matplotlib's "Blues"
            fill = tuple(int(a + (b - a) * shade) for a, b in zip((247, 251, 255), (8, 48, 107)))
            x, y = left + j * cell, top + i * cell
            draw.rectangle((x, y, x + cell, y + cell), fill=fill, outline=(220, 220, 220))
            if matrix[i, j]:
                draw.text((x + cell / 2, y + cell / 2), str(int(matrix[i, j])), font=small, anchor="mm",
                          fill="white" if shade > 0.5 else "black")
    return image


def prediction_grid(images, preds, labels, classes, cols=4):
    """HWC uint8 images titled "pred X / true Y" (green when right, red when wrong) -> one RGB PIL image."""
    font = ImageFont.load_default(size=11)
    h, w = images[0].shape[:2]
    classes = [short(c) for c in classes]
    cell_w, cell_h = max(w, int(max(font.getlength(f"pred {c}") for c in classes))) + 16, h + 34
    grid = Image.new("RGB", (cols * cell_w, math.ceil(len(images) / cols) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, pred, label) in enumerate(zip(images, preds, labels)):
        x, y = (k % cols) * cell_w, (k // cols) * cell_h
        grid.paste(Image.fromarray(image), (x + (cell_w - w) // 2, y + 30))
        draw.multiline_text((x + cell_w / 2, y + 2), f"pred {classes[pred]}\ntrue {classes[label]}", font=font, anchor="ma",
                            align="center", fill=(0, 128, 0) if pred == label else (200, 0, 0))
    return grid
