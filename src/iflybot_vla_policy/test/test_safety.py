"""Specification of the safety layer: what may reach a controller and what must be held."""
from __future__ import annotations

import numpy as np
import pytest

from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.safety import SafetyConfig, SafetyFilter, Watchdog

ROBOT = load_robot()
DT = 1.0 / 30.0


@pytest.fixture
def safety() -> SafetyFilter:
    return SafetyFilter(ROBOT, SafetyConfig())


def chunk_around(q: np.ndarray, offsets: np.ndarray, gripper: float = 0.04) -> np.ndarray:
    """(horizon, 8) chunk: q + offsets (horizon, 7) and a constant gripper width."""
    return np.hstack([q[None, :] + offsets, np.full((len(offsets), 1), gripper)])


def ramp(horizon: int, per_joint: np.ndarray) -> np.ndarray:
    return np.linspace(0.0, 1.0, horizon)[:, None] * per_joint[None, :]


def test_limits_come_from_the_robot_description_scaled_by_config():
    f = SafetyFilter(ROBOT, SafetyConfig(velocity_scale=0.25, acceleration_scale=0.5,
                                         position_margin=0.1))
    np.testing.assert_allclose(f.limits.v_max, ROBOT.dq_max * 0.25)
    np.testing.assert_allclose(f.limits.a_max, ROBOT.ddq_max * 0.5)
    np.testing.assert_allclose(f.limits.q_min, ROBOT.q_min + 0.1)


def test_bad_config_value_names_the_field():
    with pytest.raises(ValueError, match='velocity_scale'):
        SafetyConfig(velocity_scale=1.5)
    with pytest.raises(ValueError, match='unknown safety key'):
        SafetyConfig.from_mapping({'velocity_scael': 0.5})


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_action_is_held_with_reason(safety, bad):
    chunk = chunk_around(ROBOT.home, ramp(10, np.full(7, 0.05)))
    chunk[4, 3] = bad
    check = safety.check_chunk(chunk, DT, ROBOT.home)
    assert not check.ok and check.positions is None
    assert 'non-finite' in check.hold_reason and '(4, 3)' in check.hold_reason


def test_wrong_chunk_shape_is_held(safety):
    check = safety.check_chunk(np.zeros((10, 7)), DT, ROBOT.home)
    assert not check.ok and 'shape' in check.hold_reason


def test_targets_beyond_joint_limits_are_clipped_inside_the_margin(safety):
    q = ROBOT.home.copy()
    q[3] = ROBOT.q_max[3] - 0.2
    chunk = chunk_around(q, ramp(20, np.array([0, 0, 0, 0.4, 0, 0, 0])))
    check = safety.check_chunk(chunk, DT, q)
    assert check.ok
    assert check.positions[:, 3].max() <= ROBOT.q_max[3] - safety.config.position_margin
    assert any('fr3_joint4' in note for note in check.notes)


def test_jump_far_from_measured_state_is_clamped_to_max_step(safety):
    chunk = chunk_around(ROBOT.home, np.zeros((10, 7)))
    chunk[0, 0] += 1.0   # 1 rad away at t=0: more than max_step allows
    check = safety.check_chunk(chunk, DT, ROBOT.home)
    assert check.ok
    assert check.positions[0, 0] == pytest.approx(ROBOT.home[0] + safety.config.max_step)
    assert any('fr3_joint1' in n and 'max_step' in n for n in check.notes)


def test_jump_far_from_measured_state_is_held_when_configured():
    strict = SafetyFilter(ROBOT, SafetyConfig.from_mapping({'hold_on_large_step': True}))
    chunk = chunk_around(ROBOT.home, np.zeros((10, 7)))
    chunk[0, 0] += 1.0
    check = strict.check_chunk(chunk, DT, ROBOT.home)
    assert not check.ok and 'fr3_joint1' in check.hold_reason and 'max_step' in check.hold_reason


def test_large_motion_late_in_the_chunk_is_allowed_by_the_velocity_allowance(safety):
    # 1.5 rad over 30 steps at 30 Hz: the step limit grows with the time to reach the target.
    chunk = chunk_around(ROBOT.home, ramp(30, np.array([1.2, 0, 0, 0, 0, 0, 0])))
    assert safety.check_chunk(chunk, DT, ROBOT.home).ok


def test_chunk_leaving_workspace_is_truncated_at_the_box(safety):
    # Joint 2 forward and the wrist down take the TCP below the table (z < 0 leaves the box).
    chunk = chunk_around(ROBOT.home, ramp(30, np.array([0, 1.4, 0, 0, 0, 1.0, 0])))
    tcp_z = ROBOT.tcp_position(chunk[:, :7])[:, 2]
    assert tcp_z.min() < 0.0, 'test premise: the ramp leaves the box'
    check = safety.check_chunk(chunk, 1.0, ROBOT.home)
    assert check.ok and len(check.positions) < 30
    assert np.all(safety.workspace_violation(check.positions) == 0.0)
    assert any('workspace' in note for note in check.notes)


def test_gripper_width_is_clipped_to_the_hand_range(safety):
    chunk = chunk_around(ROBOT.home, np.zeros((5, 7)), gripper=0.2)
    check = safety.check_chunk(chunk, DT, ROBOT.home)
    assert np.all(check.gripper == ROBOT.gripper.max_width)


def test_tracked_trajectory_is_continuous_within_limits_and_ends_at_rest(safety):
    v0 = np.array([0.3, -0.2, 0.0, 0.1, 0.0, 0.0, 0.5])
    reference = ROBOT.home + ramp(60, np.array([0.6, -0.3, 0.2, 0.3, -0.5, 0.4, 0.8]))
    h = safety.knot_step(DT)
    traj = safety.track(ROBOT.home, v0, reference, h)
    assert safety.verify(traj, ROBOT.home, v0) == ''
    np.testing.assert_allclose(traj.positions[0], ROBOT.home)
    np.testing.assert_allclose(traj.velocities[0], v0)
    assert np.all(traj.velocities[-1] == 0.0)
    np.testing.assert_allclose(traj.positions[-1], reference[-1], atol=1e-3)


def test_step_reference_is_reached_without_overshoot(safety):
    target = ROBOT.home + 0.3
    traj = safety.track(ROBOT.home, np.zeros(7), np.repeat(target[None], 10, axis=0), 0.02)
    assert np.all(traj.positions <= target + 1e-3)
    np.testing.assert_allclose(traj.positions[-1], target, atol=1e-3)


def test_interpolated_trajectory_respects_acceleration_between_knots(safety):
    """The JTC's cubic spline through our (p, v) knots reproduces the constant-acceleration
    segments, so sampling finely shows no acceleration above the limit."""
    reference = ROBOT.home + ramp(40, np.full(7, 0.5))
    traj = safety.track(ROBOT.home, np.zeros(7), reference, safety.knot_step(DT))
    t = np.arange(0.0, traj.end, 1e-3)
    vel = np.stack([traj.sample(x)[1] for x in t])
    acc = np.diff(vel, axis=0) / 1e-3
    assert np.all(np.abs(acc) <= safety.limits.a_max * 1.01)


def test_hold_brakes_at_the_acceleration_limit_to_rest(safety):
    v0 = safety.limits.v_max * 0.9
    traj = safety.hold(ROBOT.home, v0)
    assert safety.verify(traj, ROBOT.home, v0) == ''
    assert np.all(traj.velocities[-1] == 0.0)
    stop_time = np.max(v0 / safety.limits.a_max)
    assert traj.times[-1] <= stop_time + 2 * safety.config.knot_dt


def test_hold_from_rest_is_a_valid_two_point_trajectory(safety):
    traj = safety.hold(ROBOT.home, np.zeros(7))
    assert len(traj.times) == 2 and traj.times[1] > 0.0
    assert safety.verify(traj, ROBOT.home, np.zeros(7)) == ''


def test_a_hold_is_at_rest_from_its_start_and_a_motion_only_once_finished(safety):
    # A lockstep clock never passes a hold's end time: 'finished' alone kept a run planning
    # from the old episode's pose after a sim reset.
    hold = safety.hold(ROBOT.home, np.zeros(7), start=5.0)
    assert hold.at_rest_from(5.0) and hold.at_rest_from(4.0)
    motion = safety.track(ROBOT.home, np.zeros(7), ROBOT.home + ramp(20, np.full(7, 0.2)), 0.02,
                          start=5.0)
    assert not motion.at_rest_from(5.0)
    assert not motion.at_rest_from(motion.end - 0.01)
    assert motion.at_rest_from(motion.end)
    braking = safety.hold(ROBOT.home, safety.limits.v_max * 0.5, start=5.0)
    assert not braking.at_rest_from(5.0) and braking.at_rest_from(braking.end)


def test_verify_rejects_nan_discontinuity_and_speeding(safety):
    traj = safety.track(ROBOT.home, np.zeros(7), ROBOT.home + ramp(20, np.full(7, 0.2)), 0.02)
    bad = type(traj)(traj.start, traj.times, traj.positions.copy(), traj.velocities.copy())
    bad.positions[5, 2] = np.nan
    assert 'non-finite' in safety.verify(bad, ROBOT.home, np.zeros(7))
    assert 'start at the current command' in safety.verify(traj, ROBOT.home + 0.01, np.zeros(7))
    fast = type(traj)(traj.start, traj.times, traj.positions, traj.velocities * 50.0)
    fast.velocities[0] = 0.0
    fast.velocities[-1] = 0.0
    assert 'limit' in safety.verify(fast, ROBOT.home, np.zeros(7))


def test_tracking_error_beyond_threshold_is_reported(safety):
    q = ROBOT.home.copy()
    assert safety.tracking_error_reason(q, q + 0.01) == ''
    assert 'fr3_joint1' in safety.tracking_error_reason(q, q + np.eye(7)[0] * 0.5)


def test_delta_chunk_speed_is_clamped_and_stops_at_the_workspace_box(safety):
    tcp = ROBOT.tcp_position(ROBOT.home)
    deltas = np.zeros((30, 7))
    deltas[:, 2] = -0.05   # 1.5 m/s downwards at 30 Hz: too fast, and into the table
    out, reason = safety.check_delta_chunk(deltas, DT, tcp)
    assert reason == ''
    limit = ROBOT.max_linear_velocity * safety.config.linear_velocity_scale * DT
    assert np.all(np.linalg.norm(out[:, :3], axis=1) <= limit + 1e-12)
    path = tcp + np.cumsum(out[:, :3], axis=0)
    assert path[:, 2].min() >= safety.workspace_min[2]
    bad = deltas.copy()
    bad[3, 4] = np.nan
    assert 'non-finite' in safety.check_delta_chunk(bad, DT, tcp)[1]


def test_twist_is_rate_limited_and_non_finite_becomes_zero(safety):
    twist = safety.limit_twist(np.zeros(6), np.array([1.0, 0, 0, 0, 0, 0]), 0.01)
    assert np.isclose(twist[0], safety.config.max_linear_acceleration * 0.01)
    assert np.all(safety.limit_twist(np.zeros(6), np.full(6, np.nan), 0.01) == 0.0)


def test_watchdog_reports_missing_and_stale_inputs():
    dog = Watchdog({'joint_states': 0.2, 'scene_camera': 0.5})
    assert 'joint_states: no message yet' in dog.stale_reason(0.0)
    dog.feed('joint_states', 10.0)
    dog.feed('scene_camera', 10.0)
    assert dog.stale_reason(10.1) == ''
    reason = dog.stale_reason(10.3)
    assert 'joint_states' in reason and 'scene_camera' not in reason
    with pytest.raises(ValueError, match='scene_camera'):
        Watchdog({'scene_camera': 0.0})


def test_watchdog_tells_whether_every_input_arrived_after_a_time():
    dog = Watchdog({'joint_states': 0.2, 'scene_camera': 0.5})
    assert not dog.fed_since(0.0)
    dog.feed('joint_states', 10.0)
    dog.feed('scene_camera', 10.0)
    assert dog.fed_since(9.9) and not dog.fed_since(10.0)
    dog.feed('joint_states', 10.2)
    assert not dog.fed_since(10.1)             # the camera is still older than 10.1
    dog.feed('scene_camera', 10.3)
    assert dog.fed_since(10.1)
