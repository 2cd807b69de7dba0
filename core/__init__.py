"""Shared internals of train.py and the tools in baseline/ and bench/; nothing here imports train.py.

    labels      the 18-class mask scheme (classes, task sizes, names) and natural class order
    demo        the demo data painter and the "demo data when no --data_dir" rule
    metrics     accuracy, macro F1, per-task scores, confusion matrix (numpy only)
    engine      the training loop: train one epoch, evaluate, predict; device and seeding
    checkpoint  the checkpoint format: save, read and check, load a model
    runs        run-directory outputs: next free run name, history.csv, submission CSVs
    cli         the one-line-error entry point and progress bars shared by every command
"""
