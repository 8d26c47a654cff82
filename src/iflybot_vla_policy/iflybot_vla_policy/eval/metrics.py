"""Metrics of closed-loop rollouts: success intervals, smoothness, timing and limit checks."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from iflybot_vla_policy.robot import RobotSpec


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) for no trials.

    The bounds always contain successes / trials: rounding alone gives 0.9999999999999999 as the
    upper bound of 10/10, and an interval that excludes the rate breaks error bars drawn from it.
    """
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f'successes={successes} must be within 0..trials={trials}')
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile, NaN when empty (reports show 'n/a' rather than a made-up 0)."""
    if not len(values):
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def rms_jerk(times: np.ndarray, positions: np.ndarray) -> float:
    """Root-mean-square jerk (rad/s^3) of a sampled joint trajectory.

    times: (T,) strictly increasing seconds; positions: (T, n_joints). Uses finite differences on
    the actual sample times, so an irregular control loop shows up as jerk rather than hiding.
    """
    times = np.asarray(times, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[0] != times.shape[0]:
        raise ValueError(f'positions {positions.shape} must be (len(times)={times.shape[0]}, n)')
    if times.shape[0] < 4:
        return math.nan
    if np.any(np.diff(times) <= 0):
        raise ValueError('times must be strictly increasing')
    deriv, t = positions, times
    for _ in range(3):
        dt = np.diff(t)[:, None]
        deriv = np.diff(deriv, axis=0) / dt
        t = 0.5 * (t[1:] + t[:-1])
    return float(np.sqrt(np.mean(np.sum(deriv**2, axis=1))))


def jitter(stamps: Sequence[float], period: float) -> dict[str, float]:
    """Deviation of inter-tick intervals from the nominal period, in milliseconds."""
    intervals = np.diff(np.asarray(stamps, dtype=np.float64))
    if intervals.size == 0:
        return {'p50_ms': math.nan, 'p99_ms': math.nan, 'max_ms': math.nan}
    dev = np.abs(intervals - period) * 1e3
    return {'p50_ms': float(np.percentile(dev, 50)), 'p99_ms': float(np.percentile(dev, 99)),
            'max_ms': float(dev.max())}


def missed_ticks(stamps: Sequence[float], period: float) -> int:
    """Ticks a periodic callback skipped: an interval of k periods (rounded) misses k - 1."""
    intervals = np.diff(np.asarray(stamps, dtype=np.float64))
    if intervals.size == 0 or not period > 0:
        return 0
    return int(np.maximum(np.rint(intervals / period) - 1.0, 0.0).sum())


def limit_violations(robot: RobotSpec, positions: np.ndarray, velocities: np.ndarray | None = None,
                     tolerance: float = 1e-6) -> dict[str, int]:
    """Count commanded samples outside the joint position / velocity limits.

    positions, velocities: (T, n_joints) of what was sent to the controller.
    """
    positions = np.asarray(positions, dtype=np.float64)
    below = positions < robot.q_min - tolerance
    above = positions > robot.q_max + tolerance
    counts = {'position': int(np.any(below | above, axis=1).sum()), 'velocity': 0,
              'non_finite': int((~np.isfinite(positions)).any(axis=1).sum())}
    if velocities is not None and len(velocities):
        velocities = np.asarray(velocities, dtype=np.float64)
        counts['velocity'] = int(np.any(np.abs(velocities) > robot.dq_max + tolerance,
                                        axis=1).sum())
    return counts
