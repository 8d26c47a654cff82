"""Joint trajectory following with ros2_controllers' JointTrajectoryController (JTC) semantics.

Pure numpy, no MuJoCo: the simulator samples `TrajectoryController.sample(t)` every control step
and tracks the desired state. What matches JTC:

- joints may come in any order; unknown, duplicate or missing joints are rejected;
- `time_from_start` must increase strictly; sizes must match; NaN/inf are rejected; the last
  point must have zero velocity unless `allow_nonzero_velocity_at_trajectory_end`;
  a trajectory that ends in the past is rejected;
- start time 0 means now; a later start time keeps the running trajectory until then;
- a new trajectory replaces the running one from its start time on (no queueing), interpolating
  from the desired state at that instant, so position and velocity stay continuous;
- interpolation per segment: linear (positions only), cubic Hermite (positions + velocities) or
  quintic (positions + velocities + accelerations); after the last point the position is held.

Beyond JTC (safer for a real arm): positions outside the joint limits are rejected, and points
at or before the activation time are skipped instead of jumped to.

`CommandMonitor` is what libfranka adds on the real FR3: the commanded joint positions, sampled
at 1 kHz, must keep their finite-difference velocity, acceleration and jerk inside Franka's
limits (config/robot/fr3.yaml); a violation aborts the motion with libfranka's error name.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from iflybot_vla_policy.robot import RobotSpec

COMMAND_DT = 1e-3    # s, libfranka's control period (kDeltaT)


class TrajectoryError(ValueError):
    """A trajectory was rejected; the message is the reason (logged by the sim node)."""


@dataclass(frozen=True)
class JointTrajectory:
    """A trajectory message in numpy form (validated by `make_trajectory`)."""

    joint_names: tuple[str, ...]
    times: np.ndarray                  # (n_points,) time_from_start in s, strictly increasing
    positions: np.ndarray              # (n_points, n_joints) rad
    velocities: np.ndarray | None      # (n_points, n_joints) rad/s, or None
    accelerations: np.ndarray | None   # (n_points, n_joints) rad/s^2, or None
    start_time: float = 0.0            # absolute time on the controller's clock; 0 = now


def _stack(name: str, rows: Sequence[Sequence[float]] | np.ndarray | None, n_points: int,
           n_joints: int) -> np.ndarray | None:
    """Per-point rows -> (n_points, n_joints); empty means absent; sizes must agree."""
    if rows is None:
        return None
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        arr = rows.astype(np.float64)
        if arr.shape != (n_points, n_joints):
            raise TrajectoryError(f'{name} has shape {arr.shape}, expected '
                                  f'({n_points}, {n_joints})')
    else:
        rows = [list(r) for r in rows]
        lengths = {len(r) for r in rows}
        if lengths <= {0}:
            return None
        if len(rows) != n_points:
            raise TrajectoryError(f'{name} given for {len(rows)} of {n_points} points')
        for k, row in enumerate(rows):
            if len(row) != n_joints:
                raise TrajectoryError(f'point {k}: {len(row)} {name} for {n_joints} joints')
        arr = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        k, j = np.argwhere(~np.isfinite(arr))[0]
        raise TrajectoryError(f'point {k}: {name} of joint {j} is not finite ({arr[k, j]})')
    return arr


def make_trajectory(joint_names: Sequence[str], times: Sequence[float] | np.ndarray,
                    positions: Sequence[Sequence[float]] | np.ndarray,
                    velocities: Sequence[Sequence[float]] | np.ndarray | None = None,
                    accelerations: Sequence[Sequence[float]] | np.ndarray | None = None,
                    start_time: float = 0.0) -> JointTrajectory:
    """Check structure (sizes, finiteness, strictly increasing times); raises TrajectoryError."""
    names = tuple(joint_names)
    if not names:
        raise TrajectoryError('no joint names')
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TrajectoryError(f'duplicate joint names {duplicates}')
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise TrajectoryError('empty trajectory (no points)')
    if not np.all(np.isfinite(t)):
        raise TrajectoryError('time_from_start is not finite')
    if t[0] < 0.0:
        raise TrajectoryError(f'time_from_start of point 0 is negative ({t[0]})')
    bad = np.nonzero(np.diff(t) <= 0.0)[0]
    if bad.size:
        k = int(bad[0]) + 1
        raise TrajectoryError(f'time_from_start must increase strictly: point {k} at '
                              f'{t[k]:.6g} s is not after point {k - 1} at {t[k - 1]:.6g} s')
    if not math.isfinite(start_time):
        raise TrajectoryError(f'start time is not finite ({start_time})')
    n, m = t.size, len(names)
    pos = _stack('positions', positions, n, m)
    if pos is None:
        raise TrajectoryError('points have no positions')
    vel = _stack('velocities', velocities, n, m)
    acc = _stack('accelerations', accelerations, n, m)
    if acc is not None and vel is None:
        raise TrajectoryError('accelerations given without velocities')
    return JointTrajectory(names, t, pos, vel, acc, float(start_time))


@dataclass(frozen=True)
class DesiredState:
    positions: np.ndarray      # (n_joints,)
    velocities: np.ndarray     # (n_joints,)
    accelerations: np.ndarray  # (n_joints,)


class _Spline:
    """Piecewise polynomial through knots at absolute times; holds the last knot afterwards.

    Coefficients are computed once per trajectory, so that sampling (500 times per sim second)
    is a search and one small matrix product.
    """

    def __init__(self, times: np.ndarray, pos: np.ndarray, vel: np.ndarray | None,
                 acc: np.ndarray | None) -> None:
        self.times, self.pos, self.vel, self.acc = times, pos, vel, acc  # (K,), (K, n) ...
        self._coeffs = self._fit()                   # (K - 1, 6, n): p(tau) = sum c_i tau^i
        self._hold = DesiredState(pos[-1].copy(), np.zeros(pos.shape[1]),
                                  np.zeros(pos.shape[1]))

    def _fit(self) -> np.ndarray:
        times, pos = self.times, self.pos
        n_seg, n = len(times) - 1, pos.shape[1]
        coeffs = np.zeros((max(n_seg, 0), 6, n))
        if n_seg <= 0:
            return coeffs
        h = np.diff(times)[:, None]                  # (K - 1, 1)
        p0, p1 = pos[:-1], pos[1:]
        # Coefficients a_i of the normalised time s = tau / h, then c_i = a_i / h^i.
        a = np.zeros((n_seg, 6, n))
        a[:, 0] = p0
        if self.vel is None:
            a[:, 1] = p1 - p0
        else:
            v0, v1 = self.vel[:-1] * h, self.vel[1:] * h
            a[:, 1] = v0
            if self.acc is None:
                a[:, 2] = 3 * (p1 - p0) - 2 * v0 - v1
                a[:, 3] = 2 * (p0 - p1) + v0 + v1
            else:
                a0, a1 = self.acc[:-1] * h * h, self.acc[1:] * h * h
                d = p1 - p0 - v0 - a0 / 2
                e = v1 - v0 - a0
                f = a1 - a0
                a[:, 2] = a0 / 2
                a[:, 3] = 10 * d - 4 * e + f / 2
                a[:, 4] = -15 * d + 7 * e - f
                a[:, 5] = 6 * d - 3 * e + f / 2
        powers = h[:, :, None] ** np.arange(6)[None, :, None]     # (K - 1, 6, 1)
        coeffs[:] = a / powers
        return coeffs

    @property
    def end_time(self) -> float:
        return float(self.times[-1])

    def sample(self, t: float) -> DesiredState:
        times = self.times
        if t >= times[-1] or len(times) == 1:
            return DesiredState(self._hold.positions.copy(), self._hold.velocities.copy(),
                                self._hold.accelerations.copy())
        if t <= times[0]:
            t = float(times[0])
        k = int(np.searchsorted(times, t, side='right')) - 1
        tau = t - float(times[k])
        t2, t3 = tau * tau, tau * tau * tau
        basis = np.array([[1.0, tau, t2, t3, t3 * tau, t3 * t2],
                          [0.0, 1.0, 2 * tau, 3 * t2, 4 * t3, 5 * t3 * tau],
                          [0.0, 0.0, 2.0, 6 * tau, 12 * t2, 20 * t3]])
        out = basis @ self._coeffs[k]                # (3, n)
        return DesiredState(out[0], out[1], out[2])


class TrajectoryController:
    """Desired joint state over time from a stream of trajectories (JTC semantics, see module)."""

    def __init__(self, joint_names: Sequence[str], q_min: np.ndarray, q_max: np.ndarray,
                 initial_positions: np.ndarray, now: float = 0.0,
                 allow_nonzero_velocity_at_trajectory_end: bool = False,
                 limit_tolerance: float = 1e-6) -> None:
        self.joint_names = tuple(joint_names)
        self._q_min = np.asarray(q_min, dtype=np.float64)   # (n_joints,)
        self._q_max = np.asarray(q_max, dtype=np.float64)
        self._allow_nonzero_end = allow_nonzero_velocity_at_trajectory_end
        self._tol = limit_tolerance
        self._active = self._hold_spline(np.asarray(initial_positions, np.float64), now)
        # The motion before the active one: times before the active one's start (the 1 kHz
        # sample between two physics steps, when a trajectory arrived at the later one) are
        # the old motion's, not the new one's first point held.
        self._before: _Spline | None = None
        self._pending: list[tuple[float, JointTrajectory]] = []   # (activation time, traj)
        self._last_time = now
        self._moving_anchor: tuple[float, DesiredState] | None = None

    @staticmethod
    def _hold_spline(q: np.ndarray, t: float) -> _Spline:
        return _Spline(np.array([t]), q[None].copy(), None, None)

    def hold(self, positions: np.ndarray, now: float,
             moving: DesiredState | None = None) -> None:
        """Drop all trajectories and hold `positions` (on reset, or when Servo hands over).

        `moving`: the reference at `now` if it is not at rest; a trajectory activated at `now`
        then starts from its velocity and acceleration instead of from rest.
        """
        self._active = self._hold_spline(np.asarray(positions, np.float64), now)
        self._before = None
        self._pending.clear()
        self._last_time = now
        self._moving_anchor = (now, moving) if moving is not None else None

    def validate(self, traj: JointTrajectory, now: float) -> str | None:
        """The reason JTC (plus our limit check) would reject `traj`, or None if acceptable."""
        unknown = [n for n in traj.joint_names if n not in self.joint_names]
        if unknown:
            return f'unknown joint(s) {unknown}; this controller has {list(self.joint_names)}'
        missing = [n for n in self.joint_names if n not in traj.joint_names]
        if missing:
            return f'missing joint(s) {missing} (partial goals are not allowed)'
        order = [traj.joint_names.index(n) for n in self.joint_names]
        pos = traj.positions[:, order]
        low = pos < self._q_min - self._tol
        high = pos > self._q_max + self._tol
        if np.any(low | high):
            k, j = np.argwhere(low | high)[0]
            return (f'point {k}: position {pos[k, j]:.4f} of {self.joint_names[j]} is outside '
                    f'its limits [{self._q_min[j]:.4f}, {self._q_max[j]:.4f}]')
        if traj.velocities is not None and not self._allow_nonzero_end:
            last = traj.velocities[-1]
            if np.any(last != 0.0):
                j = int(np.nonzero(last)[0][0])
                return (f'velocity of the last point is not zero for {traj.joint_names[j]} '
                        f'({last[j]:.4g}); allow_nonzero_velocity_at_trajectory_end is false')
        start = traj.start_time if traj.start_time > 0.0 else now
        if start + traj.times[-1] <= now:
            return (f'trajectory ends in the past (start {start:.3f} s + '
                    f'{traj.times[-1]:.3f} s <= now {now:.3f} s)')
        return None

    def set_trajectory(self, traj: JointTrajectory, now: float) -> str | None:
        """Accept `traj` (returns None) or reject it (returns the reason, state unchanged)."""
        reason = self.validate(traj, now)
        if reason is not None:
            return reason
        activation = max(traj.start_time, now) if traj.start_time > 0.0 else now
        self._pending = [(t, p) for t, p in self._pending if t < activation]
        self._pending.append((activation, traj))
        self._activate_due(now)
        return None

    def _activate_due(self, t: float) -> None:
        while self._pending and self._pending[0][0] <= t:
            activation, traj = self._pending.pop(0)
            self._active, self._before = self._splice(traj, activation), self._active

    def _splice(self, traj: JointTrajectory, activation: float) -> _Spline:
        """Knots: the desired state at activation, then the points after activation."""
        anchor = self._active.sample(activation)
        if self._moving_anchor is not None and self._moving_anchor[0] == activation:
            anchor = self._moving_anchor[1]
        self._moving_anchor = None
        order = [traj.joint_names.index(n) for n in self.joint_names]
        start = traj.start_time if traj.start_time > 0.0 else activation
        abs_times = start + traj.times
        keep = abs_times > activation + 1e-9
        times = np.concatenate([[activation], abs_times[keep]])
        pos = np.vstack([anchor.positions, traj.positions[keep][:, order]])
        vel = acc = None
        if traj.velocities is not None:
            vel = np.vstack([anchor.velocities, traj.velocities[keep][:, order]])
        if traj.accelerations is not None:
            acc = np.vstack([anchor.accelerations, traj.accelerations[keep][:, order]])
        return _Spline(times, pos, vel, acc)

    def sample(self, t: float) -> DesiredState:
        """Desired positions, velocities, accelerations (each (n_joints,)) at time t."""
        self._activate_due(t)
        self._last_time = t
        if self._before is not None and t < self._active.times[0]:
            return self._before.sample(t)
        return self._active.sample(t)

    @property
    def end_time(self) -> float:
        """When the running trajectory (or the last pending one) reaches its last point."""
        if self._pending:
            activation, traj = self._pending[-1]
            start = traj.start_time if traj.start_time > 0.0 else activation
            return start + float(traj.times[-1])
        return self._active.end_time


@dataclass(frozen=True)
class Reflex:
    """A motion aborted by a libfranka limit check on the command stream."""

    error: str          # libfranka's Errors field, e.g. joint_motion_generator_velocity_...
    time: float         # s, sim time of the offending command sample
    joint: str
    value: float        # the offending position (rad), velocity, acceleration or jerk
    limit: float        # the bound it crossed, same unit

    def __str__(self) -> str:
        return (f'{self.error}: {self.joint} at {self.value:.6g} beyond {self.limit:.6g} '
                f'(t={self.time:.3f} s)')


@dataclass(frozen=True)
class CommandLimits:
    """libfranka's necessary conditions on a joint command stream; arrays (n_joints,)."""

    q_min: np.ndarray
    q_max: np.ndarray
    dq_max: np.ndarray
    ddq_max: np.ndarray
    dddq_max: np.ndarray
    # q (n,) -> (lower, upper) velocity bounds (n,); None: +-dq_max
    velocity_bounds: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    eps: float = 0.0     # tolerance beyond each bound (the robot's check is the bound itself)

    @classmethod
    def from_robot(cls, robot: RobotSpec) -> CommandLimits:
        pbv = robot.velocity_limits_by_position
        jerk = robot.dddq_max if robot.dddq_max is not None else np.full(robot.n_joints, np.inf)
        bounds = None if pbv is None else (lambda q: pbv.bounds(q, robot.dq_max))
        return cls(robot.q_min, robot.q_max, robot.dq_max, robot.ddq_max, jerk, bounds)


class CommandMonitor:
    """libfranka's checks on a stream of commanded joint positions (1 kHz on the real robot).

    Velocity, acceleration and jerk are backward differences of the commanded positions, as the
    robot computes them; samples may come at any spacing (Servo's stream comes at the physics
    rate). A reset starts a stream at rest (libfranka's start condition: zero velocity and
    acceleration), so the first samples after a reset are checked against a still arm.
    """

    def __init__(self, joint_names: Sequence[str], limits: CommandLimits) -> None:
        self.joint_names = tuple(joint_names)
        self.limits = limits
        self._t = 0.0
        self._q = np.zeros(len(self.joint_names))
        self._v = np.zeros_like(self._q)      # at the midpoint of the last interval
        self._a = np.zeros_like(self._q)
        self._tv = self._ta = 0.0             # times the last v and a refer to
        self._fresh = True                    # no sample since the reset
        self.peak = np.zeros((3, len(self.joint_names)))   # max |v|, |a|, |jerk| seen

    def reset(self, q: np.ndarray, t: float) -> None:
        """Start a new stream at rest at q (n,) at time t."""
        self._q = np.asarray(q, np.float64).copy()
        self._t = self._tv = self._ta = float(t)
        self._fresh = True
        self._v = np.zeros_like(self._q)
        self._a = np.zeros_like(self._q)

    def check(self, t: float, q: np.ndarray) -> Reflex | None:
        """Add the command q (n,) at time t; the first violated condition, or None."""
        lim = self.limits
        h = t - self._t
        if h <= 0.0:
            return None
        if self._fresh:
            # The stream was at rest before the reset: as if samples h apart had held q.
            self._tv, self._ta, self._fresh = self._t - h / 2, self._t - h, False
        tv = (t + self._t) / 2
        v = (q - self._q) / h
        ta = (tv + self._tv) / 2
        a = (v - self._v) / (tv - self._tv)
        jerk = (a - self._a) / (ta - self._ta)
        self._t, self._q, self._tv, self._v, self._ta, self._a = t, q.copy(), tv, v, ta, a
        np.maximum(self.peak, np.abs(np.stack([v, a, jerk])), out=self.peak)
        eps = lim.eps
        low = q < lim.q_min - eps
        high = q > lim.q_max + eps
        if np.any(low | high):
            j = int(np.argmax(low | high))
            bound = lim.q_min[j] if low[j] else lim.q_max[j]
            return self._reflex('joint_motion_generator_position_limits_violation', t, j,
                                q[j], bound)
        if lim.velocity_bounds is not None:
            v_low, v_high = lim.velocity_bounds(q)
        else:
            v_low, v_high = -lim.dq_max, lim.dq_max
        bad = (v < v_low - eps) | (v > v_high + eps)
        if np.any(bad):
            j = int(np.argmax(bad))
            return self._reflex('joint_motion_generator_velocity_limits_violation', t, j,
                                v[j], v_low[j] if v[j] < 0 else v_high[j])
        for name, value, bound in (
                ('joint_motion_generator_velocity_discontinuity', a, lim.ddq_max),
                ('joint_motion_generator_acceleration_discontinuity', jerk, lim.dddq_max)):
            bad = np.abs(value) > bound + eps
            if np.any(bad):
                j = int(np.argmax(bad))
                return self._reflex(name, t, j, value[j], math.copysign(bound[j], value[j]))
        return None

    def _reflex(self, error: str, t: float, j: int, value: float, limit: float) -> Reflex:
        return Reflex(error, float(t), self.joint_names[j], float(value), float(limit))
