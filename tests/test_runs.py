"""core/runs.py: run-directory outputs."""
from core import runs


def test_increment_path(tmp_path):
    base = tmp_path / "exp"
    assert runs.increment_path(base) == base
    base.mkdir()
    (tmp_path / "exp2").mkdir()
    (tmp_path / "exp10").mkdir()
    (tmp_path / "experiment").mkdir()
    assert runs.increment_path(base) == tmp_path / "exp11"
