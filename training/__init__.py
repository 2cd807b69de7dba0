"""The training layer: the flag system, the training loop's parts, the checkpoint format and stop
signals. Above data / model / loss / optim (which it builds on), below train.py and the tools.

    flags       the parser and its defaults, types and ranges; --config, --resume and NNI layering; TRIAL_BUDGET
    engine      train one epoch, evaluate, predict; device and seeding
    checkpoint  the checkpoint format, whole: keys and version, save an epoch, read and check, load a model,
                what --resume restores (optimiser, schedule, RNG state) and refuses (fixed-on-resume flags)
    signals     SIGINT/SIGTERM end a run within seconds, deferred while an epoch's files are written
"""
