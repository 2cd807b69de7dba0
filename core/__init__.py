"""The bottom layer: pure helpers that import nothing else of the project (only each other), so every
layer above and every tool can use them. Above: dataset / imagedata / model / loss / optim, then training/,
then train.py and the tools.

    labels   the 18-class mask scheme (classes, task sizes, names) and natural class order (pure Python)
    metrics  accuracy, macro F1, per-task scores, confusion matrix (numpy only)
    figures  the confusion matrix and the prediction grid, drawn with PIL
    files    safe file I/O: the one torch.load (weights_only), atomic writes, JSON/YAML flag files
    runs     run-directory outputs: next free run name, config.json, history.csv, summary.json, submissions
    cli      the one-line-error entry point and progress bars shared by every command
    signals  SIGINT/SIGTERM end a run in seconds, deferred while files are written; SIGTERM/SIGHUP clean up a cache build
    demo     the demo data painter and the "demo data when no --data_dir" rule
"""
