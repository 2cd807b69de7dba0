"""Scores shared by train.py and baseline/evaluation.py: accuracy, macro F1, per-task scores,
the confusion matrix (numpy only: sklearn would add a second to every trial's start-up)."""
import numpy as np

from core.labels import TASK_SIZES, TASKS, decode_class


def confusion(labels, preds, num_classes):
    """(num_classes, num_classes) counts, rows = true class, columns = predicted."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def macro_f1(matrix):
    """Mean over all classes of 2TP / (2TP + FP + FN); a class never seen nor predicted counts as 0."""
    tp = np.diag(matrix).astype(float)
    denominator = matrix.sum(0) + matrix.sum(1)
    return float(np.mean(np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)))


def score(labels, preds, num_classes, per_task=False):
    """accuracy and macro F1 over all classes, plus {task}_accuracy / {task}_f1
    (mask, gender, age) for the 18-class mask layout."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    out = {"accuracy": float(np.mean(labels == preds)), "f1": macro_f1(confusion(labels, preds, num_classes))}
    if per_task:
        for task, size, t_true, t_pred in zip(TASKS, TASK_SIZES, decode_class(labels), decode_class(preds)):
            out[f"{task}_accuracy"] = float(np.mean(t_true == t_pred))
            out[f"{task}_f1"] = macro_f1(confusion(t_true, t_pred, size))
    return out


def confusion_image(matrix, classes, title="confusion matrix", cell=30):
    """The matrix as a heat map with its counts and the class names -> RGB PIL image. Drawn with PIL,
    not matplotlib: in milliseconds, where matplotlib's import and layout took most of a second at the
    end of every trial."""
    from PIL import Image, ImageDraw, ImageFont

    def vertical(text, font):
        strip = Image.new("RGB", (int(font.getlength(text)) + 4, 16), "white")
        ImageDraw.Draw(strip).text((2, 0), text, fill="black", font=font)
        return strip.rotate(90, expand=True)

    font, small = ImageFont.load_default(size=12), ImageFont.load_default(size=11)
    n, names = len(classes), [str(c) for c in classes]
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
