"""Stop signals: SIGINT (Ctrl-C; NNI's trial keeper) and SIGTERM (NNI's local mode) end a run within
seconds by raising KeyboardInterrupt, except while an epoch's files are written: then the signal
waits for the last file, so best.pth, last.pth and history.csv describe the same epoch, or none do."""
import contextlib
import signal


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
