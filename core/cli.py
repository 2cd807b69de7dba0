"""The entry point every command shares: argparse and user errors as one line on stderr, and progress bars.

    def main(argv): ...
    def cli(argv=None):
        return run_main("ensemble.py", main, argv)
"""
import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + line
        self.exit(2, f"{self.prog}: error: {message}\n")


def one_line(error):
    # an error raised in a loader worker arrives wrapped in the worker's traceback: keep its last line
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[-1].removeprefix("dataset.DataError: ")


def trial_budget(params):
    """NNI's Hyperband and BOHB add TRIAL_BUDGET to each trial's parameters (R / max_budget in their
    classArgs is the longest trial). Here a budget is epochs, rounded up (BOHB's are floats):
    -> the parameters with TRIAL_BUDGET replaced by epochs."""
    if "TRIAL_BUDGET" not in params:
        return params
    params = dict(params)
    budget = params.pop("TRIAL_BUDGET")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1e6:
        raise ValueError(f"TRIAL_BUDGET must be a positive number of epochs, got {budget!r}")
    params["epochs"] = math.ceil(budget - 1e-6)
    return params


def run_main(prog, main, argv=None, errors=()):
    """main(argv); a ValueError (or one of `errors`) becomes `prog: error: message` and exit code 1."""
    try:
        main(argv)
    except (ValueError, *errors) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
    return 0


def make_progress(desc):
    """tqdm bars when a person watches, nothing otherwise (a trial's log gets one line per epoch)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return lambda it: tqdm(it, desc=desc, leave=False, dynamic_ncols=True)
