"""JointTrajectoryController semantics of sim/trajectory.py (pure numpy, no MuJoCo)."""
from __future__ import annotations

import numpy as np
import pytest

from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.sim.trajectory import (
    TrajectoryController,
    TrajectoryError,
    make_trajectory,
)

ROBOT = load_robot()
NAMES = ROBOT.arm_joint_names
DT = 0.002


def controller(now: float = 0.0) -> TrajectoryController:
    return TrajectoryController(NAMES, ROBOT.q_min, ROBOT.q_max, ROBOT.home, now=now)


def ramp(offset: float, duration: float = 1.0, points: int = 5,
         start_time: float = 0.0) -> object:
    """A smooth move of every joint by `offset` rad with positions and velocities."""
    s = np.linspace(0, 1, points + 1)[1:]
    shape = 10 * s**3 - 15 * s**4 + 6 * s**5
    dshape = (30 * s**2 - 60 * s**3 + 30 * s**4) / duration
    pos = ROBOT.home + offset * shape[:, None]
    vel = offset * dshape[:, None] * np.ones(7)
    return make_trajectory(NAMES, duration * s, pos, vel, start_time=start_time)


def sample_path(ctrl: TrajectoryController, t0: float, t1: float) -> tuple[np.ndarray, ...]:
    times = np.arange(t0, t1, DT)
    states = [ctrl.sample(t) for t in times]
    return (times, np.array([s.positions for s in states]),
            np.array([s.velocities for s in states]))


def test_reaches_and_holds_the_last_point() -> None:
    ctrl = controller()
    traj = ramp(0.2)
    assert ctrl.set_trajectory(traj, now=0.0) is None
    end = ctrl.sample(1.0)
    np.testing.assert_allclose(end.positions, ROBOT.home + 0.2, atol=1e-12)
    later = ctrl.sample(5.0)
    np.testing.assert_allclose(later.positions, ROBOT.home + 0.2)
    assert np.all(later.velocities == 0.0)


def test_cubic_segments_pass_through_points_with_their_velocities() -> None:
    ctrl = controller()
    traj = ramp(0.3, points=4)
    ctrl.set_trajectory(traj, now=0.0)
    for t, q, v in zip(traj.times, traj.positions, traj.velocities, strict=True):
        state = ctrl.sample(float(t) - 1e-9)
        np.testing.assert_allclose(state.positions, q, atol=1e-7)
        np.testing.assert_allclose(state.velocities, v, atol=1e-5)


def test_replacing_mid_motion_keeps_position_and_velocity_continuous() -> None:
    ctrl = controller()
    ctrl.set_trajectory(ramp(0.4, duration=1.0), now=0.0)
    _, q_a, v_a = sample_path(ctrl, 0.0, 0.5)
    # At t = 0.5 s, while moving fast, a new trajectory to a different goal arrives.
    goal = ROBOT.home - 0.1
    new = make_trajectory(NAMES, [0.4, 0.8], [ROBOT.home + 0.1, goal],
                          [np.full(7, -0.5), np.zeros(7)])
    assert ctrl.set_trajectory(new, now=0.5) is None
    _, q_b, v_b = sample_path(ctrl, 0.5, 1.6)
    q, v = np.vstack([q_a, q_b]), np.vstack([v_a, v_b])
    acc = np.diff(v, axis=0) / DT
    assert np.max(np.abs(np.diff(q, axis=0))) < 2.0 * DT   # no position jump (< 2 rad/s * dt)
    assert np.max(np.abs(acc)) < 20.0                       # no velocity jump
    np.testing.assert_allclose(q[-1], goal, atol=1e-12)


def test_future_start_time_keeps_the_running_trajectory_until_then() -> None:
    ctrl = controller()
    ctrl.set_trajectory(ramp(0.2, duration=1.0), now=0.0)
    reference = controller()
    reference.set_trajectory(ramp(0.2, duration=1.0), now=0.0)
    delayed = make_trajectory(NAMES, [0.5], [ROBOT.home], [np.zeros(7)], start_time=0.6)
    assert ctrl.set_trajectory(delayed, now=0.1) is None
    for t in (0.2, 0.4, 0.59):
        np.testing.assert_allclose(ctrl.sample(t).positions, reference.sample(t).positions)
    assert not np.allclose(ctrl.sample(0.8).positions, reference.sample(0.8).positions)
    np.testing.assert_allclose(ctrl.sample(1.1).positions, ROBOT.home)


def test_joint_order_of_the_message_does_not_matter() -> None:
    ctrl = controller()
    target = ROBOT.home + np.linspace(0.0, 0.3, 7)
    order = [6, 2, 0, 5, 1, 4, 3]
    traj = make_trajectory([NAMES[i] for i in order], [1.0], [target[order]],
                           [np.zeros(7)])
    assert ctrl.set_trajectory(traj, now=0.0) is None
    np.testing.assert_allclose(ctrl.sample(2.0).positions, target)


def test_positions_only_interpolate_linearly() -> None:
    ctrl = controller()
    ctrl.set_trajectory(make_trajectory(NAMES, [1.0], [ROBOT.home + 0.2]), now=0.0)
    np.testing.assert_allclose(ctrl.sample(0.25).positions, ROBOT.home + 0.05)
    np.testing.assert_allclose(ctrl.sample(0.25).velocities, np.full(7, 0.2))


@pytest.mark.parametrize(('kwargs', 'reason'), [
    ({'times': [0.5, 0.5]}, 'increase strictly'),
    ({'times': [0.5, 0.4]}, 'increase strictly'),
    ({'positions': [[0.0] * 7, [0.0] * 6]}, '6 positions for 7 joints'),
    ({'positions': [[0.0] * 7, [np.nan] * 7]}, 'not finite'),
    ({'velocities': [[0.0] * 7, [np.inf] * 7]}, 'not finite'),
    ({'velocities': [[0.0] * 7]}, 'velocities given for 1 of 2 points'),
    ({'times': []}, 'empty trajectory'),
])
def test_malformed_structure_is_rejected_with_the_reason(kwargs: dict, reason: str) -> None:
    args = {'joint_names': NAMES, 'times': [0.5, 1.0],
            'positions': [ROBOT.home, ROBOT.home], 'velocities': None}
    args.update(kwargs)
    if args['times'] == []:
        args['positions'] = []
    with pytest.raises(TrajectoryError, match=reason):
        make_trajectory(**args)


@pytest.mark.parametrize(('names', 'positions', 'velocities', 'reason'), [
    (('fr3_joint1', 'elbow', *NAMES[2:]), ROBOT.home, None, r"unknown joint\(s\) \['elbow'\]"),
    (NAMES[:6], ROBOT.home[:6], None, r"missing joint\(s\) \['fr3_joint7'\]"),
    (NAMES, ROBOT.home + np.array([0, 0, 0, 3.0, 0, 0, 0]), None, 'outside its limits'),
    (NAMES, ROBOT.home, np.full(7, 0.1), 'last point is not zero'),
])
def test_semantically_invalid_trajectory_is_rejected_and_motion_continues(
        names: tuple, positions: np.ndarray, velocities: np.ndarray | None, reason: str) -> None:
    ctrl = controller()
    ctrl.set_trajectory(ramp(0.2), now=0.0)
    before = ctrl.sample(0.3).positions
    vel = None if velocities is None else [velocities]
    bad = make_trajectory(names, [1.0], [positions], vel)
    result = ctrl.set_trajectory(bad, now=0.3)
    assert result is not None
    assert pytest.importorskip('re').search(reason, result)
    np.testing.assert_allclose(ctrl.sample(0.3).positions, before)
    np.testing.assert_allclose(ctrl.sample(2.0).positions, ROBOT.home + 0.2)


def test_trajectory_that_ended_in_the_past_is_rejected() -> None:
    ctrl = controller(now=10.0)
    old = make_trajectory(NAMES, [0.5], [ROBOT.home], start_time=2.0)
    assert 'ends in the past' in ctrl.set_trajectory(old, now=10.0)
