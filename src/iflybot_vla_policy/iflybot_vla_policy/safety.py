"""Safety layer between the network and the robot: nothing the model outputs reaches a controller
unchecked.

Three jobs, all in plain numpy:
- `SafetyFilter.check_chunk` vets a proposed action chunk (finite values, shape, joint position
  limits, maximum step from the measured state, TCP workspace box) and either returns a clipped,
  possibly truncated reference or a HOLD reason.
- `track` turns a reference into a trajectory a Franka accepts: continuous with the current
  command, inside the velocity and acceleration limits, ending at zero velocity. The knots are
  constant-acceleration segments, so the cubic spline a JointTrajectoryController fits through
  (position, velocity) knots reproduces them exactly and the limits hold between knots too.
- `Watchdog` reports stale camera or joint-state input so the node can hold.

Limits come from `RobotSpec` (config/robot/fr3.yaml), scaled by `SafetyConfig`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

from iflybot_vla_policy.robot import RobotSpec


@dataclass(frozen=True)
class SafetyConfig:
    """Margins and scales applied to the robot's limits (fractions of the datasheet values)."""

    velocity_scale: float = 0.5        # fraction of dq_max the trajectories may use
    acceleration_scale: float = 0.5    # fraction of ddq_max
    position_margin: float = 0.05      # rad kept clear of every joint limit
    max_step: float = 0.5              # rad a target may lie from the measured state beyond
    #                                    what the velocity limit allows in the time until it
    hold_on_large_step: bool = False   # beyond max_step: hold (true) or clamp the target
    max_tracking_error: float = 0.3    # rad between commanded and measured state before ERROR
    workspace_margin: float = 0.0      # m the TCP box is shrunk by on every side
    tracking_bandwidth: float = 10.0   # rad/s: how fast the trajectory converges on a reference
    knot_dt: float = 0.02              # s: longest spacing of trajectory knots
    linear_velocity_scale: float = 0.3     # fraction of the Cartesian limits (ee_delta mode)
    angular_velocity_scale: float = 0.3
    max_linear_acceleration: float = 2.0   # m/s^2 between consecutive twists (ee_delta mode)
    max_angular_acceleration: float = 4.0  # rad/s^2

    def __post_init__(self) -> None:
        for name in ('velocity_scale', 'acceleration_scale', 'linear_velocity_scale',
                     'angular_velocity_scale'):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f'{name} must be in (0, 1], got {value}')
        for name in ('max_step', 'max_tracking_error', 'tracking_bandwidth', 'knot_dt',
                     'max_linear_acceleration', 'max_angular_acceleration'):
            value = getattr(self, name)
            if not value > 0.0:
                raise ValueError(f'{name} must be positive, got {value}')
        for name in ('position_margin', 'workspace_margin'):
            value = getattr(self, name)
            if not value >= 0.0:
                raise ValueError(f'{name} must be >= 0, got {value}')

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> SafetyConfig:
        """Build from a dict; unknown keys fail with the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f'unknown safety key(s) {unknown}; valid keys: {sorted(valid)}')
        return cls(**{k: (bool(v) if k == 'hold_on_large_step' else float(v))
                      for k, v in values.items()})


@dataclass(frozen=True)
class MotionLimits:
    """Per-joint bounds a trajectory must respect; arrays are (n_joints,)."""

    q_min: np.ndarray
    q_max: np.ndarray
    v_max: np.ndarray
    a_max: np.ndarray

    @property
    def n_joints(self) -> int:
        return int(self.v_max.shape[0])


@dataclass(frozen=True)
class Trajectory:
    """Knots of a joint trajectory, starting at absolute time `start` (s, caller's clock).

    times: (m,) seconds from start, times[0] == 0, strictly increasing; positions and
    velocities: (m, n_joints). Consecutive knots are joined by constant-acceleration segments.
    """

    start: float
    times: np.ndarray
    positions: np.ndarray
    velocities: np.ndarray

    @property
    def end(self) -> float:
        return self.start + float(self.times[-1])

    def at_rest_from(self, t: float) -> bool:
        """Whether the command stands still from absolute time t on: every knot from the one
        before t is at the final position with zero velocity (a hold, or a finished motion)."""
        i = max(0, int(np.searchsorted(self.times, t - self.start, side='right')) - 1)
        return bool(np.all(self.velocities[i:] == 0.0)
                    and np.all(self.positions[i:] == self.positions[-1]))

    def sample(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Position and velocity at absolute time t (cubic Hermite, as a JTC interpolates)."""
        rel = t - self.start
        if rel <= 0.0:
            return self.positions[0].copy(), self.velocities[0].copy()
        if rel >= self.times[-1]:
            return self.positions[-1].copy(), np.zeros_like(self.velocities[-1])
        i = int(np.searchsorted(self.times, rel, side='right')) - 1
        h = float(self.times[i + 1] - self.times[i])
        s = (rel - float(self.times[i])) / h
        p0, p1 = self.positions[i], self.positions[i + 1]
        v0, v1 = self.velocities[i] * h, self.velocities[i + 1] * h
        h00, h10 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s
        h01, h11 = -2 * s**3 + 3 * s**2, s**3 - s**2
        pos = h00 * p0 + h10 * v0 + h01 * p1 + h11 * v1
        dh00, dh10 = 6 * s**2 - 6 * s, 3 * s**2 - 4 * s + 1
        dh01, dh11 = -6 * s**2 + 6 * s, 3 * s**2 - 2 * s
        vel = (dh00 * p0 + dh10 * v0 + dh01 * p1 + dh11 * v1) / h
        return pos, vel


@dataclass(frozen=True)
class ChunkCheck:
    """Outcome of vetting one chunk: a usable reference, or `hold_reason` when it is rejected."""

    positions: np.ndarray | None   # (k, n_joints) clipped targets, k <= horizon
    gripper: np.ndarray | None     # (k,) opening widths in m
    hold_reason: str = ''
    notes: tuple[str, ...] = ()    # what was clipped or truncated (not a reason to hold)

    @property
    def ok(self) -> bool:
        return not self.hold_reason


def non_finite_reason(array: np.ndarray, what: str = 'action') -> str:
    """'' when every value is finite, else a reason naming the first bad entry."""
    array = np.asarray(array, dtype=np.float64)
    bad = ~np.isfinite(array)
    if not bad.any():
        return ''
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return f'non-finite {what} value {array[index]} at index {index}'


def brake(p0: np.ndarray, v0: np.ndarray, a_max: np.ndarray, h: float,
          start: float = 0.0) -> Trajectory:
    """Fastest stop from (p0, v0) at the acceleration limit; a single knot when already still."""
    p = np.asarray(p0, dtype=np.float64).copy()
    v = np.asarray(v0, dtype=np.float64).copy()
    reason = non_finite_reason(p, 'position') or non_finite_reason(v, 'velocity')
    if reason:
        raise ValueError(f'cannot brake from a non-finite state: {reason}')
    positions, velocities = [p.copy()], [v.copy()]
    while np.any(v != 0.0):
        a = np.clip(-v / h, -a_max, a_max)
        p = p + v * h + 0.5 * a * h * h
        v = v + a * h
        v[np.abs(v) < 1e-12] = 0.0
        positions.append(p.copy())
        velocities.append(v.copy())
    if len(positions) == 1:   # a JTC needs a point after t=0 to hold on
        positions.append(p.copy())
        velocities.append(v.copy())
    times = np.arange(len(positions), dtype=np.float64) * h
    return Trajectory(start, times, np.stack(positions), np.stack(velocities))


def track(p0: np.ndarray, v0: np.ndarray, reference: np.ndarray, h: float,
          limits: MotionLimits, bandwidth: float, start: float = 0.0,
          max_settle: float = 3.0) -> Trajectory:
    """Follow `reference` from the state (p0, v0), then settle on its last point at rest.

    reference: (j, n_joints) targets at times h, 2h, ... jh after start. Each step picks a
    velocity target (reference velocity + a correction that can still brake in time), moves
    towards it at most at a_max, and never exceeds v_max: a critically damped tracker whose
    saturation only shapes how fast it converges, not whether the limits hold.
    """
    p = np.asarray(p0, dtype=np.float64).copy()
    v = np.asarray(v0, dtype=np.float64).copy()
    reference = np.asarray(reference, dtype=np.float64)
    reason = (non_finite_reason(p, 'position') or non_finite_reason(v, 'velocity')
              or non_finite_reason(reference, 'reference'))
    if reason:
        raise ValueError(f'cannot track: {reason}')
    # Reference velocity and acceleration (central differences) feed forward, so a smooth
    # reference is followed smoothly; the feedback only removes the remaining error.
    padded = np.vstack([2 * reference[:1] - reference[1:2], reference, reference[-1:]]) \
        if len(reference) > 1 else np.repeat(reference, 3, axis=0)
    ref_vel = (padded[2:] - padded[:-2]) / (2 * h)
    ref_acc = (padded[2:] - 2 * padded[1:-1] + padded[:-2]) / (h * h)
    gain = min(4.0 * bandwidth, 1.0 / h)
    a_max, v_max = limits.a_max, limits.v_max
    brake_a = 0.5 * a_max
    positions, velocities = [p.copy()], [v.copy()]

    minimum, maximum = np.minimum, np.maximum   # (np.clip costs ~5x more per call)
    two_brake_a, neg_v_max, neg_a_max, half_h2 = 2.0 * brake_a, -v_max, -a_max, 0.5 * h * h

    def step(target: np.ndarray, target_vel: np.ndarray, target_acc: np.ndarray) -> None:
        nonlocal p, v
        error = target - p
        size = np.abs(error)
        correction = np.copysign(minimum(bandwidth * size, np.sqrt(two_brake_a * size)), error)
        v_target = minimum(maximum(target_vel + correction, neg_v_max), v_max)
        a = minimum(maximum(target_acc + gain * (v_target - v), neg_a_max), a_max)
        # never past the velocity limit within the step
        a = minimum(maximum(a, (neg_v_max - v) / h), (v_max - v) / h)
        p = p + v * h + half_h2 * a
        v = v + a * h
        positions.append(p)
        velocities.append(v)

    for k in range(len(reference)):
        step(reference[k], ref_vel[k], ref_acc[k])
    final = reference[-1] if len(reference) else p.copy()
    zero = np.zeros_like(p)
    for _ in range(int(max_settle / h)):
        if np.all(np.abs(v) <= a_max * h) and np.all(np.abs(final - p) < 1e-4):
            break
        step(final, zero, zero)
    # Land on zero velocity with one last in-limit step.
    a = np.clip(-v / h, -a_max, a_max)
    p = p + v * h + 0.5 * a * h * h
    v = v + a * h
    positions.append(p.copy())
    velocities.append(np.where(np.abs(v) < 1e-9, 0.0, v))
    if np.any(velocities[-1] != 0.0):   # still moving after max_settle: stop at the limit
        tail = brake(positions[-1], velocities[-1], a_max, h)
        positions.extend(tail.positions[1:])
        velocities.extend(tail.velocities[1:])
    times = np.arange(len(positions), dtype=np.float64) * h
    return Trajectory(start, times, np.stack(positions), np.stack(velocities))


class SafetyFilter:
    """Turns any proposed chunk into a safe, continuous trajectory, or says why to hold."""

    def __init__(self, robot: RobotSpec, config: SafetyConfig | None = None) -> None:
        self.robot = robot
        self.config = config or SafetyConfig()
        c = self.config
        if 2 * c.position_margin >= float(np.min(robot.q_max - robot.q_min)):
            raise ValueError(f'position_margin {c.position_margin} leaves no joint range')
        self.limits = MotionLimits(
            q_min=robot.q_min + c.position_margin, q_max=robot.q_max - c.position_margin,
            v_max=robot.dq_max * c.velocity_scale, a_max=robot.ddq_max * c.acceleration_scale)
        self.workspace_min = robot.workspace_min + c.workspace_margin
        self.workspace_max = robot.workspace_max - c.workspace_margin
        if np.any(self.workspace_min >= self.workspace_max):
            raise ValueError(f'workspace_margin {c.workspace_margin} leaves no workspace')

    # ----------------------------------------------------------------------------- chunks
    def workspace_violation(self, q: np.ndarray) -> np.ndarray:
        """Distance (m) the TCP lies outside the box; q: (..., n_joints) -> (...,)."""
        tcp = self.robot.tcp_position(q)
        below = self.workspace_min - tcp
        above = tcp - self.workspace_max
        return np.maximum(np.maximum(below, above), 0.0).max(axis=-1)

    def check_chunk(self, actions: np.ndarray, dt: float, q_measured: np.ndarray) -> ChunkCheck:
        """Vet a joint-mode chunk (horizon, n_joints + 1) against the measured arm state (n,)."""
        n = self.robot.n_joints
        actions = np.asarray(actions)
        if actions.ndim != 2 or actions.shape[1] != n + 1 or actions.shape[0] < 1:
            return ChunkCheck(None, None, f'chunk shape {actions.shape} is not (horizon, {n + 1})')
        reason = non_finite_reason(actions) or non_finite_reason([dt], 'dt')
        if reason:
            return ChunkCheck(None, None, reason)
        if not dt > 0.0:
            return ChunkCheck(None, None, f'chunk dt must be positive, got {dt}')
        q_measured = np.asarray(q_measured, dtype=np.float64)
        reason = non_finite_reason(q_measured, 'measured joint')
        if reason:
            return ChunkCheck(None, None, reason)
        actions = actions.astype(np.float64)
        notes: list[str] = []
        arm = actions[:, :n]
        lim = self.limits
        clipped = np.clip(arm, lim.q_min, lim.q_max)
        if np.any(clipped != arm):
            j = int(np.argmax(np.abs(clipped - arm).max(axis=0)))
            notes.append(f'clipped {self.robot.arm_joint_names[j]} to its position limits')
        steps = np.arange(len(arm))[:, None] * dt
        allowance = self.config.max_step + lim.v_max[None, :] * steps   # (horizon, n)
        excess = np.abs(clipped - q_measured[None, :]) - allowance
        if np.any(excess > 0.0):
            k, j = np.unravel_index(int(np.argmax(excess)), excess.shape)
            what = (f'action {k} moves {self.robot.arm_joint_names[j]} '
                    f'{abs(clipped[k, j] - q_measured[j]):.3f} rad from the measured state '
                    f'(max_step {self.config.max_step} rad + velocity allowance)')
            if self.config.hold_on_large_step:
                return ChunkCheck(None, None, what)
            clipped = np.clip(clipped, q_measured - allowance, q_measured + allowance)
            notes.append(f'clamped: {what}')
        violation = self.workspace_violation(clipped)                      # (horizon,)
        allowed = max(float(self.workspace_violation(q_measured)), 0.0) + 1e-6
        outside = np.nonzero(violation > allowed)[0]
        if len(outside):
            first = int(outside[0])
            if first == 0:
                return ChunkCheck(None, None,
                                  f'action 0 puts the TCP {violation[0]:.3f} m outside the '
                                  'workspace box')
            clipped = clipped[:first]
            notes.append(f'truncated at action {first}: TCP leaves the workspace box')
        gripper = np.clip(actions[:len(clipped), n], 0.0, self.robot.gripper.max_width)
        return ChunkCheck(clipped, gripper, '', tuple(notes))

    # ------------------------------------------------------------------------ trajectories
    def knot_step(self, dt: float) -> float:
        """Knot spacing: the action period divided evenly so no gap exceeds knot_dt."""
        return dt / max(1, math.ceil(dt / self.config.knot_dt - 1e-9))

    def track(self, p0: np.ndarray, v0: np.ndarray, reference: np.ndarray, h: float,
              start: float = 0.0) -> Trajectory:
        return track(p0, v0, reference, h, self.limits, self.config.tracking_bandwidth, start)

    def hold(self, p0: np.ndarray, v0: np.ndarray, h: float | None = None,
             start: float = 0.0) -> Trajectory:
        """Stop as fast as the acceleration limit allows, from the current command."""
        return brake(p0, v0, self.limits.a_max, h or self.config.knot_dt, start)

    def verify(self, trajectory: Trajectory, p0: np.ndarray, v0: np.ndarray,
               tolerance: float = 1e-6) -> str:
        """Last gate before a publisher: '' when the trajectory is safe, else the reason."""
        t, p, v = trajectory.times, trajectory.positions, trajectory.velocities
        n = self.robot.n_joints
        if p.ndim != 2 or p.shape[1] != n or v.shape != p.shape or t.shape != (len(p),):
            return f'trajectory shapes {t.shape}, {p.shape}, {v.shape} do not match {n} joints'
        reason = (non_finite_reason(t, 'time') or non_finite_reason(p, 'position')
                  or non_finite_reason(v, 'velocity'))
        if reason:
            return reason
        if len(t) < 2 or t[0] != 0.0 or np.any(np.diff(t) <= 0.0):
            return 'trajectory times must start at 0 and increase strictly'
        if np.abs(p[0] - p0).max() > tolerance or np.abs(v[0] - v0).max() > tolerance:
            return 'trajectory does not start at the current command'
        if np.any(v[-1] != 0.0):
            return 'trajectory does not end at rest'
        hard_min, hard_max = self.robot.q_min, self.robot.q_max
        if np.any(p < hard_min - tolerance) or np.any(p > hard_max + tolerance):
            return 'trajectory leaves the joint position limits'
        lim = self.limits
        if np.any(np.abs(v) > lim.v_max * (1 + 1e-6) + tolerance):
            j = int(np.argmax((np.abs(v) / lim.v_max).max(axis=0)))
            return f'trajectory exceeds the velocity limit of {self.robot.arm_joint_names[j]}'
        acc = np.diff(v, axis=0) / np.diff(t)[:, None]
        if np.any(np.abs(acc) > lim.a_max * (1 + 1e-6) + tolerance):
            j = int(np.argmax((np.abs(acc) / lim.a_max).max(axis=0)))
            return f'trajectory exceeds the acceleration limit of {self.robot.arm_joint_names[j]}'
        start_violation = float(self.workspace_violation(p0))
        if np.any(self.workspace_violation(p) > max(start_violation, 0.0) + 0.005):
            return 'trajectory takes the TCP outside the workspace box'
        return ''

    def tracking_error_reason(self, q_commanded: np.ndarray, q_measured: np.ndarray) -> str:
        """'' while the robot follows the command; otherwise the reason to stop."""
        error = np.abs(np.asarray(q_commanded) - np.asarray(q_measured))
        if np.all(error <= self.config.max_tracking_error):
            return ''
        j = int(np.argmax(error))
        return (f'{self.robot.arm_joint_names[j]} is {error[j]:.3f} rad from its command '
                f'(max_tracking_error {self.config.max_tracking_error} rad)')

    # ----------------------------------------------------------------------- ee_delta mode
    def check_delta_chunk(self, actions: np.ndarray, dt: float,
                          tcp_now: np.ndarray) -> tuple[np.ndarray | None, str]:
        """Vet an ee_delta chunk (horizon, 7): clamp speeds, stop at the workspace box."""
        actions = np.asarray(actions)
        if actions.ndim != 2 or actions.shape[1] != 7 or actions.shape[0] < 1:
            return None, f'ee_delta chunk shape {actions.shape} is not (horizon, 7)'
        reason = non_finite_reason(actions) or non_finite_reason([dt], 'dt')
        if reason:
            return None, reason
        if not dt > 0.0:
            return None, f'chunk dt must be positive, got {dt}'
        out = actions.astype(np.float64).copy()
        c, r = self.config, self.robot
        out[:, :3] = _clip_norm(out[:, :3], r.max_linear_velocity * c.linear_velocity_scale * dt)
        out[:, 3:6] = _clip_norm(out[:, 3:6],
                                 r.max_angular_velocity * c.angular_velocity_scale * dt)
        out[:, 6] = np.clip(out[:, 6], 0.0, r.gripper.max_width)
        path = np.asarray(tcp_now, dtype=np.float64) + np.cumsum(out[:, :3], axis=0)  # (h, 3)
        outside = np.nonzero(np.any((path < self.workspace_min) | (path > self.workspace_max),
                                    axis=1))[0]
        if len(outside):
            out[int(outside[0]):, :6] = 0.0
        return out, ''

    def limit_twist(self, previous: np.ndarray, desired: np.ndarray, dt: float) -> np.ndarray:
        """Rate-limit a twist (6,) [linear m/s, angular rad/s] against the previous one."""
        c, r = self.config, self.robot
        desired = np.asarray(desired, dtype=np.float64)
        if non_finite_reason(desired):
            desired = np.zeros(6)
        lin = _clip_norm(desired[None, :3], r.max_linear_velocity * c.linear_velocity_scale)[0]
        ang = _clip_norm(desired[None, 3:], r.max_angular_velocity * c.angular_velocity_scale)[0]
        prev = np.asarray(previous, dtype=np.float64)
        lin = prev[:3] + _clip_norm((lin - prev[:3])[None], c.max_linear_acceleration * dt)[0]
        ang = prev[3:] + _clip_norm((ang - prev[3:])[None], c.max_angular_acceleration * dt)[0]
        return np.concatenate([lin, ang])


def _clip_norm(vectors: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale rows (k, 3) down to at most max_norm, keeping direction."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    scale = np.minimum(1.0, max_norm / np.maximum(norms, 1e-12))
    return vectors * scale


class Watchdog:
    """Tracks when each input last arrived; any input older than its timeout is stale."""

    def __init__(self, timeouts: Mapping[str, float]) -> None:
        for name, timeout in timeouts.items():
            if not timeout > 0.0:
                raise ValueError(f'watchdog timeout for {name!r} must be positive, got {timeout}')
        self.timeouts = dict(timeouts)
        self._last: dict[str, float] = {}

    def feed(self, name: str, now: float) -> None:
        if name not in self.timeouts:
            raise KeyError(f'unknown watchdog input {name!r}; known: {sorted(self.timeouts)}')
        self._last[name] = now

    def reset(self) -> None:
        self._last.clear()

    def age(self, name: str, now: float) -> float:
        last = self._last.get(name)
        return math.inf if last is None else now - last

    def fed_since(self, t: float) -> bool:
        """Whether every input has arrived at least once after time `t`."""
        return all(self._last.get(name, -math.inf) > t for name in self.timeouts)

    def stale_reason(self, now: float) -> str:
        """'' when every input is fresh, else which ones are stale and by how much."""
        problems = []
        for name, timeout in self.timeouts.items():
            age = self.age(name, now)
            if age == math.inf:
                problems.append(f'{name}: no message yet')
            elif age > timeout:
                problems.append(f'{name}: {age:.2f} s old (timeout {timeout:.2f} s)')
        return ('stale input: ' + '; '.join(problems)) if problems else ''
