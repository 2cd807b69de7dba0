"""Signal handling, in one place (pure Python: signal, contextlib, threading).

STOP: SIGINT (Ctrl-C; NNI's trial keeper) and SIGTERM (NNI's local mode) end a run within seconds by
raising KeyboardInterrupt, except while an epoch's files are written: then the signal waits for the
last file, so best.pth, last.pth and history.csv describe the same epoch, or none do.
signals_raise: where nothing else handles SIGTERM and SIGHUP (inference.py, a script), they raise
SystemExit for a while, so that the files being written (a cache's temp file) are cleaned up.
"""
import contextlib
import signal
import threading


class StopSignals:
    def __init__(self):
        self.deferring, self.pending = False, None

    def install(self):
        # Installed explicitly: a shell script's background job starts with SIGINT ignored, and Python keeps that.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.on_signal)

    def on_signal(self, signum, frame):
        if self.deferring:
            self.pending = signum
        else:
            raise KeyboardInterrupt(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(signum)


STOP = StopSignals()  # one per process: signal handlers are


@contextlib.contextmanager
def signals_raise():
    """SIGTERM and SIGHUP, where nothing else handles them (inference.py, a script), raise SystemExit while a
    cache is built, so that its temp file is removed: by default they end the process without cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def stop(signum, frame):
        raise SystemExit(128 + signum)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for signum, handler in previous.items():
        if handler == signal.SIG_DFL:
            signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
