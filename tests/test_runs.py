"""core/runs.py: run-directory outputs."""
import pytest

from core import runs


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
