"""The time-alignment rule shared by the policy node and bag-to-dataset conversion."""
from __future__ import annotations

import math

import numpy as np
import pytest

from iflybot_vla_policy.observation_sync import (
    SKEW_FRACTION,
    align,
    frame_period,
    nearest_index,
    skew_limit,
)


def test_nearest_index_picks_the_closest_stamp_and_the_earlier_on_a_tie():
    stamps = np.array([0.0, 0.2, 0.4])
    np.testing.assert_array_equal(nearest_index(stamps, [-1.0, 0.09, 0.1, 0.11, 0.39, 9.0]),
                                  [0, 0, 0, 1, 2, 2])
    np.testing.assert_array_equal(nearest_index([5.0], [0.0, 10.0]), [0, 0])
    with pytest.raises(ValueError, match='at least one stamp'):
        nearest_index([], [0.0])


def test_the_default_limit_is_a_fraction_of_the_camera_period():
    assert frame_period([0.0, 0.1, 0.2, 0.5]) == pytest.approx(0.1)   # median, not mean
    assert math.isnan(frame_period([1.0]))
    assert skew_limit(0.2) == pytest.approx(SKEW_FRACTION * 0.2)
    assert skew_limit(0.2, limit=0.01) == 0.01
    assert skew_limit(math.nan) == math.inf                           # unknown: no check


def test_align_names_the_input_furthest_from_the_reference():
    a = align({'scene': [1.0, 1.2], 'wrist': [1.05, 1.25], 'joints': [1.19, 1.21]}, 1.2)
    assert a.picks == {'scene': 1, 'wrist': 1, 'joints': 0}
    assert a.skew == pytest.approx(0.05)
    assert a.describe(0.03) == ('observation out of sync: wrist +50.0 ms from the frames '
                                '(limit 30.0 ms)')
