"""core/runs.py: run-directory outputs, and a finalize run dir's report."""
import json

import pytest

from core import runs
from core.cli import UserError


def test_increment_path(tmp_path):
    base = tmp_path / "exp"
    assert runs.increment_path(base) == base
    base.mkdir()
    (tmp_path / "exp2").mkdir()
    (tmp_path / "exp10").mkdir()
    (tmp_path / "experiment").mkdir()
    assert runs.increment_path(base) == tmp_path / "exp11"


def test_summary_round_trip_and_a_run_that_did_not_finish(tmp_path):
    with pytest.raises(ValueError, match="no summary.json, so the run did not finish"):
        runs.read_summary(tmp_path)
    runs.write_summary(tmp_path, {"best": {"value": 0.9}, "files": ["best.pth"]})
    assert runs.read_summary(tmp_path) == {"best": {"value": 0.9}, "files": ["best.pth"]}
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "summary.json").write_text("{half")
    with pytest.raises(ValueError, match="summary.json: not valid JSON"):
        runs.read_summary(tmp_path)


@pytest.mark.parametrize("name", ["exp[1]", "a*b", "what?", "[x]"])
def test_run_names_are_literal_not_globs(tmp_path, name):
    # as a glob, "exp[1]" matched exp1, never itself: its second run failed with "max() arg is an empty sequence"
    (tmp_path / "exp1").mkdir()
    (tmp_path / "ab").mkdir()
    first = runs.increment_path(tmp_path / name)
    assert first == tmp_path / name
    first.mkdir()
    second = runs.increment_path(tmp_path / name)
    assert second == tmp_path / f"{name}2"
    second.mkdir()
    assert runs.increment_path(tmp_path / name) == tmp_path / f"{name}3"


def test_a_finalize_report_is_read_whole_or_refused_in_one_line(tmp_path):
    report = dict(select="greedy", k=2, winner="defaults", greedy_weights={"defaults": 3, "seed7": 1})
    (tmp_path / runs.FINALIZE_REPORT).write_text(json.dumps(report))
    assert runs.read_report(tmp_path) == report
    assert runs.voted_models(tmp_path, report) == [(tmp_path / "defaults" / "fold0" / runs.BEST, 0.375),
                                                   (tmp_path / "defaults" / "fold1" / runs.BEST, 0.375),
                                                   (tmp_path / "seed7" / "fold0" / runs.BEST, 0.125),
                                                   (tmp_path / "seed7" / "fold1" / runs.BEST, 0.125)]
    assert runs.voted_models(tmp_path, report, "winner") == [(tmp_path / "defaults" / f"fold{i}" / runs.BEST, 0.5) for i in range(2)]
    for damaged in ("{", json.dumps(report).replace('"greedy_weights"', '"other"'), "[]"):
        (tmp_path / runs.FINALIZE_REPORT).write_text(damaged)
        with pytest.raises(UserError, match="damaged"):
            runs.read_report(tmp_path)
