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
