"""bench/searches.py's wait on an experiment: NNI's own end, a budget of epochs, a stall and a deadline, through
run_experiment with nnictl and the REST API stood in for (the real experiment: test_finalize's deadline test)."""
import time

import pytest

from bench import searches
from search.trials import Experiment, Trial


class FakeNNI:
    """nnictl and the REST API of one experiment whose status and reported epochs the test sets."""

    def __init__(self, monkeypatch, status="RUNNING", epochs=0):
        self.status, self.epochs, self.calls = status, epochs, []
        monkeypatch.setattr(searches.nni_io, "nnictl", self.nnictl)
        monkeypatch.setattr(searches.nni_io, "rest", self.rest)
        monkeypatch.setattr(searches, "from_rest", lambda port: Experiment("abcd1234", self.status, {}, [
            Trial("t1", "SUCCEEDED", intermediates=[{}, {}]), Trial("t2", "RUNNING", intermediates=[{}])], "fake"))

    def nnictl(self, *args, env=None):
        self.calls.append(args[0])
        return 0, "Experiment ID: abcd1234"

    def rest(self, port, path):
        if path == "check-status":
            return {"status": self.status}
        return [{"type": "PERIODICAL"}] * self.epochs if path == "metric-data" else []


def config():
    return dict(experimentName="fake", trialCommand="python3 train.py", trainingService={"platform": "local"})


def test_a_deadline_returns_what_finished_and_stops_the_experiment(monkeypatch, tmp_path, capsys):
    nni = FakeNNI(monkeypatch, epochs=3)
    t0 = time.monotonic()
    exp, jobs, minutes = searches.run_experiment(config(), 1, tmp_path, deadline_s=1.5)
    assert 1.5 <= time.monotonic() - t0 < 4 and exp.id == "abcd1234" and nni.calls == ["create", "stop"]
    assert capsys.readouterr().out == ("deadline 1.5 s reached: 1 of 2 trials of abcd1234 finished, 3 epochs reported; "
                                       "the experiment is stopped\n")


def test_a_stall_exits_and_stops_the_experiment(monkeypatch, tmp_path):
    nni = FakeNNI(monkeypatch)
    with pytest.raises(SystemExit, match="experiment abcd1234 failed or stalled"):
        searches.run_experiment(config(), 1, tmp_path, stall_s=0.5, deadline_s=60)
    assert nni.calls == ["create", "stop"]


@pytest.mark.parametrize("status, epochs, budget, ended", [("DONE", 0, None, "DONE"), ("ERROR", 0, None, "ERROR"),
                                                           ("RUNNING", 5, 5, "BUDGET"), ("RUNNING", 4, 5, "STALLED")])
def test_the_wait_ends_by_nni_by_the_budget_or_by_a_stall(monkeypatch, status, epochs, budget, ended):
    FakeNNI(monkeypatch, status, epochs)
    assert searches.wait_experiment(1, budget, stall_s=0.2, until=time.monotonic() + 60, poll_s=0.05) == ended


def test_new_epochs_keep_a_slow_experiment_from_stalling(monkeypatch):
    nni = FakeNNI(monkeypatch)
    real_rest = nni.rest

    def rest(port, path):  # an epoch every poll: never 0.2 s without one
        nni.epochs += path == "metric-data"
        return real_rest(port, path)
    monkeypatch.setattr(searches.nni_io, "rest", rest)
    assert searches.wait_experiment(1, stall_s=0.2, until=time.monotonic() + 1, poll_s=0.05) == "DEADLINE"
