"""The fault matrix (issue 27): bad inputs and faults each node must survive, and what must
happen. One row per fault; docs/faults.md is the table, naming this module's rows and the tests
elsewhere that already check a fault (those are not repeated here).

Every policy-node row runs the real node over DDS (the harness of test_policy_node.py, the
`tiny` preset) during a run, switches one input to a bad one, and requires: a hold whose cause
names the input, no chunk computed from the bad input, every command published meanwhile safe
(finite, inside the FR3 limits, no faster than its velocity limits, gripper inside the hand's
range), and the run resuming on its own once the input is good again.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip('rclpy')

from iflybot_vla_msgs.msg import PolicyStatus  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402

import test_policy_node as policy_node_tests  # noqa: E402
from iflybot_vla_policy.ros.conversions import rgb_to_image  # noqa: E402
from test_policy_node import RELAXED, ROBOT, Harness, assert_valid_trajectory  # noqa: E402

# the policy node's test harness and model, shared (fixtures of test_policy_node.py)
harness = policy_node_tests.harness
tiny_policy = policy_node_tests.tiny_policy

pytestmark = pytest.mark.ros

CONFIG = Path(__file__).resolve().parents[2] / 'iflybot_bringup' / 'config'
FINGERS = [0.02, 0.02]


# ------------------------------------------------------------------------------ bad inputs
def _image(h: Harness) -> Image:
    return rgb_to_image(h.image, 'bgr8', stamp=h._stamp())


def wrong_encoding(h: Harness) -> Image:
    msg = _image(h)
    msg.encoding = 'yuv422'
    return msg


def short_buffer(h: Harness) -> Image:
    msg = _image(h)
    msg.data = bytes(msg.data)[:len(msg.data) // 2]
    return msg


def empty_image(h: Harness) -> Image:
    msg = _image(h)
    msg.width, msg.height, msg.step, msg.data = 0, 0, 0, b''
    return msg


def step_too_small(h: Harness) -> Image:
    msg = _image(h)
    msg.step = 10
    return msg


def _joints(h: Harness, names: list[str], positions: list[float]) -> JointState:
    msg = JointState(name=names, position=positions)
    msg.header.stamp = h._stamp()
    return msg


def renamed_joint(h: Harness) -> JointState:
    names = [('joint3' if n == 'fr3_joint3' else n) for n in ROBOT.arm_joint_names]
    return _joints(h, names + list(ROBOT.finger_joint_names), list(h.q) + FINGERS)


def missing_joint(h: Harness) -> JointState:
    return _joints(h, list(ROBOT.arm_joint_names[:-1]) + list(ROBOT.finger_joint_names),
                   list(h.q[:-1]) + FINGERS)


def fewer_positions_than_names(h: Harness) -> JointState:
    return _joints(h, list(ROBOT.arm_joint_names) + list(ROBOT.finger_joint_names), list(h.q))


INPUT_FAULTS = [
    pytest.param('camera', wrong_encoding, 'yuv422', id='camera-wrong-encoding'),
    pytest.param('camera', short_buffer, 'needs', id='camera-short-buffer'),
    pytest.param('camera', empty_image, 'empty image', id='camera-empty-image'),
    pytest.param('camera', step_too_small, 'smaller than width', id='camera-step-too-small'),
    pytest.param('joints', renamed_joint, 'joint_states', id='joints-renamed'),
    pytest.param('joints', missing_joint, 'joint_states', id='joints-missing'),
    pytest.param('joints', fewer_positions_than_names, 'joint_states',
                 id='joints-fewer-positions-than-names'),
]


class BadInput:
    """Replaces the harness's good stream of one input by `make(h)` until `stop()`."""

    def __init__(self, h: Harness, kind: str, make: Callable[[Harness], object]) -> None:
        self.h, self.kind, self.on = h, kind, True
        if kind == 'camera':
            h.publish_images = False
            self.timer = h.tap.create_timer(0.1, self._images)
        else:
            h.publish_joints = False
            self.timer = h.tap.create_timer(0.02, self._joints)
        self.make = make

    def _images(self) -> None:
        if self.on:
            msg = self.make(self.h)
            for pub in self.h.image_pubs:
                pub.publish(msg)

    def _joints(self) -> None:
        if self.on:
            self.h.js_pub.publish(self.make(self.h))

    def stop(self) -> None:
        self.on = False
        self.timer.cancel()
        if self.kind == 'camera':
            self.h.publish_images = True
        else:
            self.h.publish_joints = True


def assert_every_command_safe(h: Harness) -> None:
    """No NaN/inf, nothing outside the FR3 limits or faster than its velocity limits, every
    gripper width inside the hand's range."""
    trajectories = h.received()
    assert trajectories
    for msg in trajectories:
        assert_valid_trajectory(msg)
    with h.lock:
        widths = [g.width for g in h.grippers]
    assert all(np.isfinite(w) and 0.0 <= w <= ROBOT.gripper.max_width for w in widths), widths


@pytest.mark.parametrize('kind, make, named', INPUT_FAULTS)
def test_policy_node_holds_on_a_bad_input_naming_it_and_resumes_when_it_is_good(
        harness, tiny_policy, wait, kind: str, make: Callable, named: str) -> None:
    h = harness({'instruction': 'pick', 'inference_rate_hz': 4.0, 'max_tracking_error': 10.0,
                 **RELAXED}, factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    assert wait(lambda: len(h.received()) >= 2, timeout=60)
    with h.lock:
        seen = len(h.statuses)
    bad = BadInput(h, kind, make)

    def named_hold() -> bool:      # published, or seen by polling
        with h.lock:
            recent = [*h.statuses[seen:], h.node.status()]
        return any(s.state == PolicyStatus.STATE_HOLD and named in s.last_error for s in recent)

    assert wait(named_hold, timeout=30), h.node.status().last_error
    time.sleep(0.5)                         # a chunk in flight at the switch may still land
    with h.lock:
        chunks = len(h.chunks)
    time.sleep(1.0)
    with h.lock:
        assert len(h.chunks) == chunks, 'a chunk was computed from a bad input'
    assert h.node.status().state != PolicyStatus.STATE_ERROR, h.node.status().last_error
    sent = len(h.received())
    bad.stop()
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_RUNNING
                and len(h.received()) >= sent + 2, timeout=60), h.node.status().last_error
    assert_every_command_safe(h)


def test_the_hold_of_a_renamed_joint_names_the_joint_in_the_status(harness, tiny_policy,
                                                                   wait) -> None:
    h = harness({'instruction': 'pick', 'inference_rate_hz': 4.0, 'max_tracking_error': 10.0,
                 **RELAXED}, factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    assert wait(lambda: len(h.received()) >= 1, timeout=60)
    BadInput(h, 'joints', renamed_joint)
    # the hold the bad joint states cause (not one at start-up, before the first frames)
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_HOLD
                and 'joint_states' in h.node.status().last_error, timeout=30)
    assert 'fr3_joint3' in h.node.status().last_error


def test_the_hold_of_an_undecodable_camera_lasts_while_its_frames_are_bad(harness, tiny_policy,
                                                                          wait) -> None:
    h = harness({'instruction': 'pick', 'inference_rate_hz': 4.0, 'max_tracking_error': 10.0,
                 **RELAXED}, factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    assert wait(lambda: len(h.received()) >= 1, timeout=60)
    BadInput(h, 'camera', wrong_encoding)
    assert wait(lambda: 'yuv422' in h.node.status().last_error, timeout=30)
    with h.lock:
        seen = len(h.statuses)
    assert wait(lambda: len(h.statuses) >= seen + 4, timeout=30)
    with h.lock:
        states = [s.state for s in h.statuses[seen:]]
    assert set(states) == {PolicyStatus.STATE_HOLD}, states


# ------------------------------------------------------------------------------ config typos
def _recorder(context: object, tmp_path: Path, overrides: dict) -> object:
    from iflybot_vla_policy.ros.recorder_node import RecorderNode

    params = [Parameter(k, value=v) for k, v in {'output_dir': str(tmp_path), **overrides}.items()]
    return RecorderNode(context=context, parameter_overrides=params)


def test_a_misspelled_recorder_parameter_is_named_with_the_closest_known_one(
        ros_context, tmp_path: Path) -> None:
    node = _recorder(ros_context, tmp_path, {'flush_perod_s': 0.5})
    try:
        assert node.unknown_parameters() == [
            "unknown parameter 'flush_perod_s' ignored; did you mean 'flush_period_s'?"]
        assert node.recorder.config.flush_period_s == 0.1      # the default, not 0.5
    finally:
        node.destroy_node()


def test_every_key_of_the_shipped_recorder_config_is_a_recorder_parameter(
        ros_context, tmp_path: Path) -> None:
    values = yaml.safe_load((CONFIG / 'recorder.yaml').read_text())['/**']['ros__parameters']
    values['output_dir'] = str(tmp_path)
    topics = values.pop('topics')      # their entries have their own test (bad topic entry)
    node = _recorder(ros_context, tmp_path, values)
    try:
        assert node.unknown_parameters() == [] and node.has_parameter('topics') and topics
        assert node.recorder.config.flush_period_s == values['flush_period_s']
    finally:
        node.destroy_node()



# ------------------------------------------------------------------------------ graph crashes
def test_a_sigkilled_policy_ends_the_sim_graph_by_name_after_a_trajectory_that_ends_at_rest(
        ros_context, tmp_path: Path, wait) -> None:
    """The policy is a required node: its crash ends `iflybot up sim` (exit 1, the node named)
    and stops the simulator cleanly. What the arm was last told ends at rest within the limits,
    so a controller that outlives the policy (the real FR3's) stops there."""
    from rclpy.executors import SingleThreadedExecutor
    from trajectory_msgs.msg import JointTrajectory

    node = rclpy.create_node('fault_matrix_graph', context=ros_context)
    received: list[JointTrajectory] = []
    node.create_subscription(JointTrajectory, '/fr3_arm_controller/joint_trajectory',
                             received.append, 10)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    log = tmp_path / 'up.log'
    proc = subprocess.Popen(
        [sys.executable, '-m', 'iflybot_vla_policy.cli', 'up', '--lifecycle-timeout', '90', 'sim',
         'preset:=tiny', 'instruction:=pick up the red block', 'image_width:=64',
         'image_height:=64'], stdout=log.open('w'), stderr=subprocess.STDOUT, cwd=tmp_path,
        env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        assert wait(lambda: len(received) >= 2 or proc.poll() is not None, timeout=240), \
            log.read_text()
        pids = {m.group(1): int(m.group(2))
                for m in re.finditer(r'started /(\S+) \(pid (\d+)\)', log.read_text())}
        os.kill(pids['iflybot_policy'], signal.SIGKILL)
        code = proc.wait(timeout=60)
        last = received[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        executor.shutdown(timeout_sec=2.0)
        thread.join(timeout=5)
        node.destroy_node()
    text = log.read_text()
    assert code == 1, text
    assert 'FAILED: required node iflybot_policy was killed by SIGKILL' in text, text
    assert wait(lambda: not _alive(pids['iflybot_sim']), timeout=10), text
    assert_valid_trajectory(last)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
