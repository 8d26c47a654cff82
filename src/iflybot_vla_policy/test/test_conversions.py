"""Specification of the ROS <-> core conversions used by the policy node."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('rclpy')

from sensor_msgs.msg import Image, JointState  # noqa: E402
from visualization_msgs.msg import Marker  # noqa: E402

from iflybot_vla_policy.robot import load_robot  # noqa: E402
from iflybot_vla_policy.ros.conversions import (  # noqa: E402
    ENCODINGS,
    action_chunk_msg,
    gripper_command_msg,
    image_to_rgb,
    joint_positions,
    path_markers,
    rgb_to_image,
    robot_state,
    trajectory_from_msg,
    trajectory_msg,
    twist_msg,
)
from iflybot_vla_policy.safety import SafetyFilter  # noqa: E402

ROBOT = load_robot()


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
@pytest.mark.parametrize('padding', [0, 3])
def test_colour_image_round_trips_through_every_encoding(rgb, encoding, padding):
    channels = ENCODINGS[encoding][0]
    msg = rgb_to_image(rgb, encoding, step=rgb.shape[1] * channels + padding)
    assert msg.step == rgb.shape[1] * channels + padding
    out = image_to_rgb(msg, use_cv_bridge=False)
    assert out.dtype == np.uint8 and out.shape == rgb.shape and out.flags['C_CONTIGUOUS']
    np.testing.assert_array_equal(out, rgb)


def test_bgr_bytes_are_swapped_to_rgb():
    msg = Image(height=1, width=2, encoding='bgr8', step=6, data=bytes([1, 2, 3, 4, 5, 6]))
    np.testing.assert_array_equal(image_to_rgb(msg, use_cv_bridge=False),
                                  [[[3, 2, 1], [6, 5, 4]]])


def test_bgra_alpha_is_dropped_and_padding_ignored():
    data = bytes([10, 20, 30, 99, 0xEE, 0xEE, 40, 50, 60, 99, 0xEE, 0xEE])   # 2 rows, 2 pad
    msg = Image(height=2, width=1, encoding='bgra8', step=6, data=data)
    np.testing.assert_array_equal(image_to_rgb(msg, use_cv_bridge=False),
                                  [[[30, 20, 10]], [[60, 50, 40]]])


@pytest.mark.parametrize('padding', [0, 5])
def test_mono_image_becomes_grey_rgb(padding):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    data = np.hstack([grey, np.full((3, padding), 0xFF, np.uint8)]).tobytes()
    msg = Image(height=3, width=4, encoding='mono8', step=4 + padding, data=data)
    out = image_to_rgb(msg, use_cv_bridge=False)
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_unsupported_encoding_fails_naming_it_and_the_choices(rgb):
    msg = rgb_to_image(rgb)
    msg.encoding = '16UC1'
    with pytest.raises(ValueError, match=r"'16UC1'.*rgb8"):
        image_to_rgb(msg, use_cv_bridge=False)


def test_truncated_image_data_fails_with_sizes(rgb):
    msg = rgb_to_image(rgb)
    msg.data = bytes(msg.data)[:-10]
    with pytest.raises(ValueError, match='bytes'):
        image_to_rgb(msg, use_cv_bridge=False)


def test_step_smaller_than_a_row_fails(rgb):
    msg = rgb_to_image(rgb)
    msg.step = 5
    with pytest.raises(ValueError, match='step'):
        image_to_rgb(msg, use_cv_bridge=False)


def test_requiring_cv_bridge_without_it_fails_clearly(rgb):
    pytest.importorskip('numpy')
    try:
        import cv_bridge  # noqa: F401
        pytest.skip('cv_bridge is installed here')
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match='cv_bridge'):
        image_to_rgb(rgb_to_image(rgb), use_cv_bridge=True)


def test_joint_state_is_reordered_by_name():
    msg = JointState(name=['fr3_finger_joint1', 'fr3_joint2', 'fr3_joint1', 'fr3_finger_joint2'],
                     position=[0.01, 2.0, 1.0, 0.02])
    np.testing.assert_allclose(joint_positions(msg, ['fr3_joint1', 'fr3_joint2']), [1.0, 2.0])


def test_robot_state_is_arm_joints_plus_gripper_width():
    names = list(ROBOT.arm_joint_names) + list(ROBOT.finger_joint_names)
    msg = JointState(name=names[::-1], position=[0.03, 0.01] + list(ROBOT.home[::-1]))
    state = robot_state(msg, ROBOT.arm_joint_names, ROBOT.finger_joint_names)
    assert state.dtype == np.float32 and state.shape == (8,)
    np.testing.assert_allclose(state[:7], ROBOT.home, rtol=1e-6)
    assert state[7] == pytest.approx(0.04)


def test_missing_joint_names_the_joint():
    msg = JointState(name=['fr3_joint1'], position=[0.0])
    with pytest.raises(KeyError, match='fr3_joint2'):
        joint_positions(msg, ['fr3_joint1', 'fr3_joint2'])


def test_trajectory_message_round_trips_with_increasing_times():
    safety = SafetyFilter(ROBOT)
    traj = safety.track(ROBOT.home, np.zeros(7), ROBOT.home + np.linspace(0, 0.3, 20)[:, None],
                        0.02)
    msg = trajectory_msg(traj, ROBOT.arm_joint_names)
    assert list(msg.joint_names) == list(ROBOT.arm_joint_names)
    assert msg.header.stamp.sec == 0 and msg.header.stamp.nanosec == 0
    back = trajectory_from_msg(msg)
    assert np.all(np.diff(back.times) > 0)
    np.testing.assert_allclose(back.times, traj.times, atol=1e-9)
    np.testing.assert_allclose(back.positions, traj.positions)
    np.testing.assert_allclose(back.velocities, traj.velocities)
    assert all(v == 0.0 for v in msg.points[-1].velocities)


def test_action_chunk_message_is_row_major_with_separate_gripper():
    chunk = np.arange(24, dtype=np.float64).reshape(3, 8)
    msg = action_chunk_msg(chunk, 0.1, ROBOT.arm_joint_names, model_id='tiny',
                           inference_latency_ms=12.5)
    assert (msg.horizon, msg.action_dim) == (3, 7)
    np.testing.assert_allclose(np.reshape(msg.positions, (3, 7)), chunk[:, :7])
    np.testing.assert_allclose(msg.gripper, chunk[:, 7])
    assert msg.model_id == 'tiny' and msg.inference_latency_ms == 12.5


def test_twist_and_gripper_messages_carry_the_values():
    msg = twist_msg(np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    assert (msg.twist.linear.z, msg.twist.angular.x) == (0.3, 0.4)
    with pytest.raises(ValueError, match='6'):
        twist_msg(np.zeros(3))
    cmd = gripper_command_msg(0.02, 0.05, 20.0, True)
    assert (cmd.width, cmd.grasp) == (0.02, True)


def test_path_markers_follow_forward_kinematics():
    path = ROBOT.home + np.linspace(0, 0.2, 5)[:, None]
    markers = path_markers(ROBOT, path).markers
    line = markers[0]
    assert line.type == Marker.LINE_STRIP and len(line.points) == 5
    tcp = ROBOT.tcp_position(path[-1])
    assert (line.points[-1].x, line.points[-1].y, line.points[-1].z) == pytest.approx(tuple(tcp))
    assert markers[1].pose.position.z == pytest.approx(tcp[2])
    assert path_markers(ROBOT, np.zeros((0, 7))).markers[0].action == Marker.DELETE


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')])
def test_a_non_finite_joint_position_is_refused_naming_the_joint(value):
    msg = JointState(name=['fr3_joint1', 'fr3_joint2', 'fr3_joint3'],
                     position=[0.1, value, 0.3])
    with pytest.raises(ValueError, match=f'fr3_joint2 = {value}'):
        joint_positions(msg, ['fr3_joint1', 'fr3_joint2'])
    np.testing.assert_allclose(joint_positions(msg, ['fr3_joint1']), [0.1])  # others unharmed
