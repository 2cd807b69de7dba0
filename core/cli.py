"""The entry point every command shares: argparse and user errors as one line on stderr, and progress bars.

    def main(argv): ...
    def cli(argv=None):
        return run_main("ensemble.py", main, argv)
"""
import argparse
import sys


class UserError(ValueError):
    """A user's mistake (a file, flag or value): run_main prints it as one line naming the problem. Any other
    exception, a ValueError from numpy or from this project's own bug, keeps its traceback. A ValueError, so that
    code catching ValueError around a check still catches it."""


class Resumable(UserError):
    """The machine stopped the run, not a mistake in what it was given (a full disk, the GPU's memory): train.py's line
    adds what --resume continues from (training.checkpoint.interruption_says)."""
    resume_said = False


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + line
        self.exit(2, f"{self.prog}: error: {message}\n")


def one_line(error):
    # an error raised in a loader worker arrives wrapped in the worker's traceback: keep its last line
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[-1].removeprefix("imagedata.layouts.DataError: ")


def one_line_reason(error):
    """torch's multi-line errors (load_state_dict's "Error(s) in loading ...") -> the line that says what."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__


def run_main(prog, main, argv=None, errors=()):
    """main(argv); a UserError (or one of `errors`) becomes `prog: error: message` and exit code 1."""
    try:
        main(argv)
    except (UserError, *errors) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
    return 0


def make_progress(desc):
    """tqdm bars when a person watches, nothing otherwise (a trial's log gets one line per epoch)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return lambda it: tqdm(it, desc=desc, leave=False, dynamic_ncols=True)
