"""core/labels.py: the 18-class scheme."""
import pytest

from core import labels


@pytest.mark.parametrize("age,bounds,band", [(29, (30, 60), 0), (30, (30, 60), 1), (59, (30, 60), 1), (60, (30, 60), 2), (58, (30, 58), 2)])
def test_age_bounds(age, bounds, band):
    assert labels.age_band(age, bounds) == band
