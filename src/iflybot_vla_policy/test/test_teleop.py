"""Teleoperation: key handling, SpaceMouse reports, and the node over DDS with the recorder."""
from __future__ import annotations

import random
import struct
import threading
import time

import numpy as np
import pytest

from iflybot_vla_policy.spacemouse import (
    SpaceMouseState,
    find_spacemouse,
    parse_spacemouse_report,
    spacemouse_twist,
)
from iflybot_vla_policy.teleop import KeyboardTeleop, TeleopConfig


@pytest.fixture
def ros_context(monkeypatch):
    """rclpy Context on a private DDS domain (215-232, Linux-safe, unused by other tests).

    The project's tests share domains 1-100 at random; a graph of another test on the same
    domain would add messages to these exact-count checks or answer these services.
    """
    domain = random.randint(215, 232)
    monkeypatch.setenv('ROS_DOMAIN_ID', str(domain))     # for child processes too
    rclpy = pytest.importorskip('rclpy')
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    try:
        yield context
    finally:
        if context.ok():
            rclpy.shutdown(context=context)


def test_held_key_moves_and_release_stops_within_the_hold_time():
    t = KeyboardTeleop(TeleopConfig(linear_speed=0.1, key_hold_s=0.15))
    t.press('w', 0.0)
    lin, ang = t.twist(0.1)
    np.testing.assert_allclose(lin, [0.1, 0, 0])
    np.testing.assert_allclose(ang, 0)
    t.press('w', 0.12)                     # terminal key repeat
    assert t.twist(0.25)[0][0] == pytest.approx(0.1)
    assert not t.twist(0.3)[0].any()       # released: 0.18 s after the last repeat


def test_combined_keys_add_and_speed_scale_is_clamped():
    t = KeyboardTeleop(TeleopConfig(linear_speed=0.1, angular_speed=0.5, max_linear_speed=0.3))
    t.press('w', 0.0)
    t.press('q', 0.0)
    t.press('j', 0.0)
    lin, ang = t.twist(0.0)
    np.testing.assert_allclose(lin, [0.1, 0, 0.1])
    np.testing.assert_allclose(ang, [0, 0, 0.5])
    for _ in range(10):
        assert t.press('+', 0.0) == 'faster'
    assert np.linalg.norm(t.twist(0.0)[0]) == pytest.approx(0.3)


def test_event_keys_toggle_the_gripper_and_name_episode_actions():
    t = KeyboardTeleop()
    assert t.gripper_width == 0.08
    assert t.press(' ', 0.0) == 'toggle_gripper' and t.gripper_width == 0.0
    assert [t.press(k, 0.0) for k in '1230'] == ['start', 'stop_success', 'stop_failure',
                                                 'discard']
    assert t.press('W', 0.0) is None and 'w' in t.active_keys(0.0)


def test_spacemouse_reports_map_to_base_frame_twists():
    state = SpaceMouseState()
    # device: push away from the user (-y) and up (-z); yaw about device z
    parse_spacemouse_report(bytes([1]) + struct.pack('<3h', 0, -350, -175), state)
    parse_spacemouse_report(bytes([2]) + struct.pack('<3h', 0, 0, 350), state)
    parse_spacemouse_report(bytes([3, 0b10]), state)
    np.testing.assert_allclose(state.translation, [1.0, 0.0, 0.5])
    np.testing.assert_allclose(state.rotation, [0.0, 0.0, -1.0])
    assert state.buttons == 2
    lin, ang = spacemouse_twist(state, TeleopConfig(linear_speed=0.1, angular_speed=0.5))
    assert lin[0] > 0 and lin[2] > 0 and ang[2] < 0
    state.translation = np.array([0.01, 0, 0])
    assert not spacemouse_twist(state, TeleopConfig())[0].any()     # deadband


def test_no_spacemouse_is_found_in_an_empty_sysfs(tmp_path):
    (tmp_path / 'hidraw0' / 'device').mkdir(parents=True)
    (tmp_path / 'hidraw0' / 'device' / 'uevent').write_text('HID_ID=0003:0000045E:00000001\n')
    assert find_spacemouse(tmp_path) is None


@pytest.mark.ros
def test_teleop_node_publishes_twists_gripper_and_records_an_episode(ros_context, tmp_path,
                                                                   wait):
    rclpy = pytest.importorskip('rclpy')
    from geometry_msgs.msg import TwistStamped
    from iflybot_vla_msgs.msg import GripperCommand
    from rclpy.executors import MultiThreadedExecutor

    from iflybot_vla_policy.data.episode_recorder import read_index
    from iflybot_vla_policy.ros.recorder_node import RecorderNode
    from iflybot_vla_policy.ros.teleop_node import TeleopNode

    P = rclpy.parameter.Parameter
    teleop = TeleopNode(context=ros_context, parameter_overrides=[
        P('spacemouse', value='off'), P('task', value='teleop_test')])
    recorder = RecorderNode(context=ros_context, parameter_overrides=[
        P('output_dir', value=str(tmp_path)), P('min_free_disk_gb', value=0.0),
        P('topics', value=['/servo_node/delta_twist_cmds:geometry_msgs/msg/TwistStamped',
                           '/vla/gripper_command:iflybot_vla_msgs/msg/GripperCommand'])])
    probe = rclpy.create_node('teleop_probe', context=ros_context)
    twists, grips = [], []
    probe.create_subscription(TwistStamped, '/servo_node/delta_twist_cmds', twists.append, 10)
    probe.create_subscription(GripperCommand, '/vla/gripper_command', grips.append, 10)
    executor = MultiThreadedExecutor(num_threads=2, context=ros_context)
    for n in (teleop, recorder, probe):
        executor.add_node(n)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        assert wait(lambda: teleop.twist_pub.get_subscription_count() >= 2, timeout=10)
        assert wait(teleop.start_client.service_is_ready, timeout=10)
        teleop.keys.put('1')
        assert wait(lambda: recorder.recorder.recording, timeout=10)
        time.sleep(0.2)
        for _ in range(5):
            teleop.keys.put('w')
            time.sleep(0.05)
        teleop.keys.put(' ')
        assert wait(lambda: len(grips) == 1 and any(t.twist.linear.x > 0 for t in twists))
        assert wait(lambda: twists[-1].twist.linear.x == 0.0, timeout=5)   # stops on release
        assert grips[0].width == 0.0 and grips[0].grasp
        teleop.keys.put('2')
        assert wait(lambda: len(read_index(tmp_path)) == 1, timeout=10)
        entry = read_index(tmp_path)[0]
        assert entry['success'] is True and entry['task'] == 'teleop_test'
        assert entry['message_count'] == len(twists) + len(grips) + 2
        assert wait(lambda: any('stop episode' in m and 'dropped 0' in m
                                for m in teleop.messages), timeout=5)
    finally:
        executor.shutdown()
        for n in (teleop, recorder, probe):
            n.destroy_node()
