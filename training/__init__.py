"""The training layer: the flag system, the training loop's parts and the checkpoint format (the stop
signals are core/signals.py). Above data / model / loss / optim (which it builds on), below train.py and the tools.

    flags       the parser and its defaults, types and ranges; --config, --resume and NNI layering; TRIAL_BUDGET
    engine      train one epoch, evaluate, predict; device and seeding
    checkpoint  the checkpoint format, whole: keys and version, save an epoch, read and check, load a model,
                what --resume restores (optimiser, schedule, RNG state) and refuses (fixed-on-resume flags)
"""
