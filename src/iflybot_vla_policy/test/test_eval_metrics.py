"""Evaluation metrics give the textbook values on inputs whose answer is known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from iflybot_vla_policy.eval.metrics import jitter, limit_violations, rms_jerk, wilson_interval
from iflybot_vla_policy.robot import load_robot


def test_wilson_interval_matches_reference_values() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3)
    assert high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_wilson_interval_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match='successes=11'):
        wilson_interval(11, 10)


def test_jerk_of_a_cubic_is_its_constant_third_derivative() -> None:
    t = np.linspace(0.0, 1.0, 101)
    q = np.stack([2.0 * t**3, np.zeros_like(t)], axis=1)   # d3/dt3 = 12
    assert rms_jerk(t, q) == pytest.approx(12.0, rel=1e-6)


def test_a_position_step_has_far_more_jerk_than_a_smooth_ramp() -> None:
    t = np.linspace(0.0, 1.0, 101)
    smooth = (0.5 - 0.5 * np.cos(np.pi * t))[:, None]
    step = (t >= 0.5).astype(float)[:, None]
    assert rms_jerk(t, step) > 100 * rms_jerk(t, smooth)


def test_jitter_is_zero_for_a_perfect_clock_and_sees_a_late_tick() -> None:
    assert jitter(np.arange(10) * 0.01, 0.01)['max_ms'] == pytest.approx(0.0, abs=1e-9)
    stamps = list(np.arange(10) * 0.01)
    stamps[5] += 0.004
    assert jitter(stamps, 0.01)['max_ms'] == pytest.approx(4.0, abs=1e-6)
    assert math.isnan(jitter([1.0], 0.01)['p99_ms'])


def test_limit_violations_count_samples_outside_the_fr3_limits() -> None:
    robot = load_robot('fr3')
    q = np.tile(robot.home, (5, 1))
    q[2, 3] = 0.0            # joint 4 must stay below -0.1518
    q[4, 0] = np.nan
    dq = np.zeros((5, 7))
    dq[1, 4] = 6.0           # joint 5 limit 5.26 rad/s
    counts = limit_violations(robot, q, dq)
    assert counts == {'position': 1, 'velocity': 1, 'non_finite': 1}
