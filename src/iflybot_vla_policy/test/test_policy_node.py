"""The policy node over real DDS: lifecycle, output contract, watchdog, NaN guard, continuity,
cancel and e-stop. The arm test drives the MuJoCo sim node (a subprocess); the others feed the
node from in-test publishers so inputs can be stopped at will. The model is the `tiny` preset
with random weights (its chunks are wild: the safety layer clamps them)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip('rclpy')

from iflybot_vla_msgs.action import RunPolicy  # noqa: E402
from iflybot_vla_msgs.msg import ActionChunk, GripperCommand, PolicyStatus  # noqa: E402
from lifecycle_msgs.msg import State  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.time import Time as RosTime  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Bool  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from iflybot_vla_policy.robot import load_robot  # noqa: E402
from iflybot_vla_policy.ros.conversions import rgb_to_image, trajectory_from_msg  # noqa: E402
from iflybot_vla_policy.ros.policy_node import NodeConfig, PolicyNode, parse_config  # noqa: E402
from iflybot_vla_policy.safety import SafetyConfig, SafetyFilter  # noqa: E402

pytestmark = pytest.mark.ros

ROBOT = load_robot()
SAFETY = SafetyFilter(ROBOT, SafetyConfig())
YAML = Path(__file__).resolve().parents[2] / 'iflybot_bringup' / 'config' / 'policy.yaml'
TRAJECTORY_TOPIC = '/fr3_arm_controller/joint_trajectory'
# A shared 2-core test machine delivers messages late at times: generous timeouts in tests.
# This process publishes the test inputs and runs the model: under the interpreter lock its
# input timers starve for a few hundred ms at times, so inputs are late and out of sync.
RELAXED = {'joint_state_timeout_s': 1.0, 'camera_timeout_s': 1.5, 'max_observation_skew_s': 1.0}


@pytest.fixture(scope='module')
def tiny_policy():
    from iflybot_vla_policy.policy import Policy
    return Policy.from_config('tiny', seed=0)


class Harness:
    """The node under test plus a test node (inputs and taps) on one executor in a context."""

    def __init__(self, context: object, params: dict, factory: Callable | None,
                 inputs: bool = True) -> None:
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        self.node = PolicyNode(policy_factory=factory, context=context,
                               parameter_overrides=overrides)
        self.tap = rclpy.create_node('policy_node_test', context=context)
        self.lock = threading.Lock()
        self.trajectories: list[tuple[float, JointTrajectory]] = []
        self.chunks: list[ActionChunk] = []
        self.markers: list[MarkerArray] = []
        self.grippers: list[GripperCommand] = []
        self.statuses: list[PolicyStatus] = []
        self.joint_states: list[JointState] = []
        self.publish_joints = inputs
        self.publish_images = inputs
        self.q = ROBOT.home.copy()
        self.stamp_offset = 0.0   # s added to the input stamps (negative: sent long ago)
        tap = self.tap
        tap.create_subscription(JointTrajectory, TRAJECTORY_TOPIC, self._on_trajectory, 50)
        tap.create_subscription(ActionChunk, '/vla/action_chunk', self._keep(self.chunks), 50)
        tap.create_subscription(MarkerArray, '/vla/markers', self._keep(self.markers), 50)
        tap.create_subscription(GripperCommand, '/vla/gripper_command',
                                self._keep(self.grippers), 50)
        tap.create_subscription(PolicyStatus, '/vla/status', self._keep(self.statuses), 50)
        tap.create_subscription(JointState, '/joint_states', self._keep(self.joint_states), 50)
        if inputs:
            self.js_pub = tap.create_publisher(JointState, '/joint_states', 10)
            self.image_pubs = [tap.create_publisher(
                type(rgb_to_image(np.zeros((1, 1, 3), np.uint8))),
                f'/{c}/color/image_raw', 10) for c in ('scene_camera', 'wrist_camera')]
            self.image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
            tap.create_timer(0.02, self._publish_joint_state)
            tap.create_timer(0.1, self._publish_images)
        self.success_pub = tap.create_publisher(Bool, '/sim/task_success', 10)
        # Before the spin thread starts: rclpy's ActionClient registers itself with the node
        # before it has its lock, so one made while spinning can kill the executor thread
        # ("'ActionClient' object has no attribute '_lock'", seen in a full run).
        self.run_policy = ActionClient(tap, RunPolicy, '/iflybot_policy/run_policy')
        self.executor = MultiThreadedExecutor(num_threads=6, context=context)
        self.executor.add_node(self.node)
        self.executor.add_node(tap)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _keep(self, store: list) -> Callable:
        def callback(msg: object) -> None:
            with self.lock:
                store.append(msg)
        return callback

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        with self.lock:
            self.trajectories.append((time.monotonic(), msg))

    def _publish_joint_state(self) -> None:
        if self.publish_joints:
            msg = JointState(name=list(ROBOT.arm_joint_names) + list(ROBOT.finger_joint_names),
                             position=list(self.q) + [0.02, 0.02])
            msg.header.stamp = self._stamp()
            self.js_pub.publish(msg)

    def _publish_images(self) -> None:
        if self.publish_images:
            stamp = self._stamp()
            for pub in self.image_pubs:
                pub.publish(rgb_to_image(self.image, 'bgr8', stamp=stamp))

    def _stamp(self):
        now = self.tap.get_clock().now().nanoseconds
        return RosTime(nanoseconds=now + int(self.stamp_offset * 1e9)).to_msg()

    def send_goal(self, wait: Callable, **goal: object) -> object:
        """Send a RunPolicy goal, assert it is accepted, return its handle."""
        assert self.run_policy.wait_for_server(timeout_sec=10)
        future = self.run_policy.send_goal_async(RunPolicy.Goal(**goal))
        assert wait(future.done, timeout=10) and future.result().accepted
        return future.result()

    def configure_and_activate(self, wait: Callable) -> None:
        assert self.node.trigger_configure() == TransitionCallbackReturn.SUCCESS, \
            self.node.configure_error
        assert wait(lambda: self.node.runtime.q_measured is not None, timeout=60)
        assert self.node.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def received(self) -> list[JointTrajectory]:
        with self.lock:
            return [m for _, m in self.trajectories]

    def close(self) -> None:
        # Stop spinning first: cleanup destroys subscriptions, and destroying them while the
        # spin thread builds its wait set raised InvalidHandle in that thread (seen in CI).
        self.executor.shutdown(timeout_sec=5)
        self.thread.join(timeout=5)   # a spin thread alive at exit aborts the interpreter
        state = self.node._state_machine.current_state[0]
        if state == State.PRIMARY_STATE_ACTIVE:
            self.node.trigger_deactivate()
        if self.node._state_machine.current_state[0] == State.PRIMARY_STATE_INACTIVE:
            self.node.trigger_cleanup()   # joins the inference worker
        self.node.destroy_node()
        self.tap.destroy_node()


@pytest.fixture
def harness(ros_context: object) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(params: dict, factory: Callable | None = None, inputs: bool = True) -> Harness:
        made.append(Harness(ros_context, params, factory, inputs))
        return made[-1]

    yield make
    for h in made:
        h.close()


def arm_positions(msg: JointState) -> np.ndarray:
    names = list(msg.name)
    return np.array([msg.position[names.index(n)] for n in ROBOT.arm_joint_names])


def assert_valid_trajectory(msg: JointTrajectory) -> None:
    """The output contract: our joints, finite, increasing times, within limits, ends at rest."""
    assert list(msg.joint_names) == list(ROBOT.arm_joint_names)
    traj = trajectory_from_msg(msg)
    assert np.all(np.isfinite(traj.positions)) and np.all(np.isfinite(traj.velocities))
    assert SAFETY.verify(traj, traj.positions[0], traj.velocities[0]) == '', msg


# ------------------------------------------------------------------------------- parameters
def test_every_node_parameter_is_in_the_yaml_with_a_comment_and_parses():
    params = yaml.safe_load(YAML.read_text())['iflybot_policy']['ros__parameters']
    assert set(params) == {f for f in NodeConfig.__dataclass_fields__}
    text = YAML.read_text()
    for name in params:   # each parameter is documented: a comment line or a trailing comment
        lines = text.splitlines()
        i = next(k for k, line in enumerate(lines) if line.strip().startswith(f'{name}:'))
        assert '#' in lines[i] or lines[i - 1].strip().startswith('#'), name
    values = {k: [x for x in v if x] if isinstance(v, list) else v for k, v in params.items()}
    assert parse_config(values, ROBOT) == parse_config({}, ROBOT)


@pytest.mark.parametrize('name, value', [
    ('execution_strategy', 'smooth'), ('control_rate_hz', -5.0), ('action_mode', 'cartesian'),
    ('camera_topics', ['/only_one']), ('velocity_scale', 2.0), ('server_uri', 'http://x'),
    ('seed', 'seven'), ('noise_scale', 1.5)])
def test_bad_parameter_fails_configure_naming_it(harness, name, value):
    params = {name: value}
    if name == 'server_uri':
        params['inference_backend'] = 'remote'
    h = harness(params, factory=lambda cfg: pytest.fail('must not load a model'), inputs=False)
    assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert f'parameter {name}' in h.node.configure_error


def test_unloadable_checkpoint_fails_configure_naming_it(harness, tmp_path):
    h = harness({'checkpoint': str(tmp_path / 'missing')}, inputs=False)
    assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert 'parameter checkpoint' in h.node.configure_error


def test_the_node_runs_a_checkpoint_with_its_bundle_noise_scale_unless_set(harness, tmp_path):
    from _vla_fixtures import small_config
    from iflybot_vla_policy.policy import Policy

    ckpt = Policy.from_config(small_config(), seed=0).save(tmp_path / 'ckpt')
    (ckpt / 'bundle.yaml').write_text('inference: {noise_scale: 0.0}\n')
    for params, expected in (({}, 0.0), ({'noise_scale': 0.5}, 0.5)):
        h = harness({'checkpoint': str(ckpt), 'warmup_inferences': 0, **params}, inputs=False)
        assert h.node.trigger_configure() == TransitionCallbackReturn.SUCCESS, \
            h.node.configure_error
        assert h.node.runtime.policy.noise_scale == expected


# ------------------------------------------------------------------------------- with the sim
@pytest.fixture
def sim_process() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'iflybot_vla_policy.ros.sim_node', '--ros-args',
         '-p', 'image_width:=64', '-p', 'image_height:=48', '-p', 'camera_rate:=10.0',
         '-p', 'joint_state_rate:=50.0', '-p', 'home_noise:=0.0'],
        env={**os.environ, 'OMP_NUM_THREADS': '1'})
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_configure_activate_sends_trajectories_at_the_configured_rate_and_the_sim_arm_moves(
        harness, sim_process, wait):
    rate = 2.0
    # Random weights propose wild chunks: small steps and speeds keep the TCP in the box. The
    # sim falls behind real time on a loaded machine, so it lags the (wall-clock) command.
    h = harness({'preset': 'tiny', 'instruction': 'put the red block in the bowl',
                 'inference_rate_hz': rate, 'max_step': 0.05, 'velocity_scale': 0.1,
                 'max_tracking_error': 2.0, **RELAXED}, inputs=False)
    h.configure_and_activate(wait)
    assert wait(lambda: len(h.received()) >= 2, timeout=60), h.node.status()
    first_q = arm_positions(h.joint_states[-1])
    t0, n0 = time.monotonic(), len(h.received())
    assert wait(lambda: len(h.received()) >= n0 + 6, timeout=60), h.node.status()
    elapsed = time.monotonic() - t0
    sent = len(h.received()) - n0
    # Never faster than configured. How close to the rate it keeps up is a benchmark figure
    # (ros/node_bench.py), not a test: a floor here failed a loaded run at 0.29 of 2 Hz.
    assert sent / elapsed <= rate * 1.5
    for msg in h.received():
        assert_valid_trajectory(msg)
    with h.lock:
        q_now = arm_positions(h.joint_states[-1])
    assert np.abs(q_now - first_q).max() > 0.01, 'the simulated arm did not move'
    assert h.statuses and h.statuses[-1].chunks_produced >= 6
    assert len(h.chunks) >= 6 and h.chunks[-1].horizon > 0 and h.markers


# ----------------------------------------------------------------------- with test publishers
def test_stale_joint_state_holds_within_the_timeout_and_fresh_input_resumes(
        harness, tiny_policy, wait):
    timeout = 0.5
    h = harness({'instruction': 'pick', 'inference_rate_hz': 4.0, 'max_tracking_error': 10.0,
                 'joint_state_timeout_s': timeout, 'camera_timeout_s': 2.0},
                factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    assert wait(lambda: len(h.received()) >= 2, timeout=60)
    h.publish_joints = False
    stopped = time.monotonic()
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_HOLD, timeout=10)
    held_after = time.monotonic() - stopped
    status = h.node.status()
    assert 'joint_states' in status.last_error
    # Deadline: the timeout plus a few control ticks on a loaded machine.
    assert held_after < timeout + 2.0, held_after
    time.sleep(0.3)
    held = h.received()
    # The hold is a trajectory that brakes to rest within the limits ...
    assert_valid_trajectory(held[-1])
    time.sleep(1.0)
    # ... and nothing else is sent while the input is stale (late results are dropped).
    assert len(h.received()) == len(held)
    h.publish_joints = True
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_RUNNING, timeout=10)
    assert wait(lambda: len(h.received()) >= len(held) + 3, timeout=60)


def test_stale_camera_holds(harness, tiny_policy, wait):
    h = harness({'instruction': 'pick', 'inference_rate_hz': 4.0, 'max_tracking_error': 10.0,
                 'joint_state_timeout_s': 2.0, 'camera_timeout_s': 0.5},
                factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    assert wait(lambda: len(h.received()) >= 1, timeout=60)
    h.publish_images = False
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_HOLD, timeout=10)
    assert 'camera' in h.node.status().last_error


class NaNEveryOtherChunk:
    """Wraps a policy; every other chunk carries a NaN (and one an inf), the others hold the
    observed joints (the random model's own chunks may leave the workspace box and be
    rejected for that, which would leave nothing finite to check)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls = 0
        self.model_id = 'tiny+nan'

    def infer(self, obs: dict) -> dict:
        out = dict(self.inner.infer(obs))
        self.calls += 1
        actions = np.tile(np.asarray(obs['state'], np.float32),
                          (len(out['actions']), 1))            # (horizon, 8)
        if self.calls % 2 == 0:
            actions[self.calls % len(actions), self.calls % 8] = np.nan
            actions[-1, 0] = np.inf
        out['actions'] = actions
        return out


def test_nan_from_the_model_never_reaches_a_publisher(harness, tiny_policy, wait):
    wrapper = NaNEveryOtherChunk(tiny_policy)
    h = harness({'instruction': 'pick', 'inference_rate_hz': 5.0, 'max_tracking_error': 10.0,
                 **RELAXED}, factory=lambda cfg: wrapper)
    h.configure_and_activate(wait)
    assert wait(lambda: wrapper.calls >= 9, timeout=90)
    time.sleep(0.5)
    with h.lock:
        trajectories = [m for _, m in h.trajectories]
        chunks, markers, grippers = list(h.chunks), list(h.markers), list(h.grippers)
    assert len(trajectories) >= 3 and chunks
    for msg in trajectories:
        assert_valid_trajectory(msg)
    for chunk in chunks:
        assert np.all(np.isfinite(chunk.positions)) and np.all(np.isfinite(chunk.gripper))
    for array in markers:
        for marker in array.markers:
            assert all(np.isfinite([p.x, p.y, p.z]).all() for p in marker.points)
    assert all(np.isfinite(g.width) for g in grippers)
    assert any('non-finite' in s.last_error for s in h.statuses)


@pytest.mark.parametrize('strategy', ['blend', 'rtc', 'ensemble', 'naive'])
def test_commanded_motion_is_continuous_across_chunk_boundaries(harness, tiny_policy, wait,
                                                                 strategy):
    """Each trajectory starts on the one it replaces: its first point (position and velocity)
    is a point of the previous trajectory, and every trajectory is within the limits."""
    h = harness({'instruction': 'pick', 'inference_rate_hz': 5.0, 'max_tracking_error': 10.0,
                 'execution_strategy': strategy, **RELAXED}, factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    assert wait(lambda: len(h.received()) >= 5, timeout=90), h.node.status()
    msgs = h.received()[:5]
    for msg in msgs:
        assert_valid_trajectory(msg)
    for previous, current in zip(msgs, msgs[1:], strict=False):
        before, after = trajectory_from_msg(previous), trajectory_from_msg(current)
        t = np.arange(0.0, before.end + 1e-3, 1e-3)
        samples = [before.sample(x) for x in t]
        gap = min(np.abs(p - after.positions[0]).max() + 0.01 * np.abs(v - after.velocities[0])
                  .max() for p, v in samples)
        assert gap < 2e-3, f'{strategy}: trajectory starts {gap:.4f} off the previous one'


def test_cancel_of_run_policy_holds(harness, tiny_policy, wait):
    h = harness({'inference_rate_hz': 5.0, 'max_tracking_error': 10.0, **RELAXED},
                factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    assert h.node.status().state == PolicyStatus.STATE_HOLD   # no instruction yet
    handle = h.send_goal(wait, instruction='pick', max_duration=60.0)
    assert wait(lambda: len(h.received()) >= 2, timeout=60)
    cancel = handle.cancel_goal_async()
    assert wait(cancel.done, timeout=10)
    canceled_at = time.monotonic()
    result = handle.get_result_async()
    assert wait(result.done, timeout=10)
    assert result.result().result.reason == 'canceled'
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_HOLD, timeout=5)
    time.sleep(1.0)
    with h.lock:
        late = [m for t, m in h.trajectories if t > canceled_at]
    assert len(late) <= 1   # at most the hold itself (it may have arrived before `canceled_at`)
    for msg in late:
        traj = trajectory_from_msg(msg)
        assert np.all(traj.velocities[-1] == 0.0)


def test_run_policy_ends_with_success_when_the_task_succeeds(harness, tiny_policy, wait):
    h = harness({'inference_rate_hz': 5.0, 'max_tracking_error': 10.0, **RELAXED},
                factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    handle = h.send_goal(wait, instruction='pick', max_duration=60.0)
    assert wait(lambda: len(h.received()) >= 1, timeout=60)
    h.success_pub.publish(Bool(data=False))
    h.success_pub.publish(Bool(data=True))
    result = handle.get_result_async()
    assert wait(result.done, timeout=30)
    assert result.result().result.success and result.result().result.reason == 'success'
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_HOLD, timeout=5)


def test_a_success_left_over_from_the_last_episode_does_not_end_the_next_goal(
        harness, tiny_policy, wait):
    # Through ROS, a seed scored a 0.9 s success: the simulator's task_success=True of the
    # episode before its reset reached the node after the new goal had started.
    h = harness({'inference_rate_hz': 5.0, 'max_tracking_error': 10.0, **RELAXED},
                factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    result = h.send_goal(wait, instruction='pick', max_duration=60.0).get_result_async()
    h.success_pub.publish(Bool(data=True))   # stale: before any task_success=False of this run
    assert wait(lambda: len(h.received()) >= 2, timeout=60)
    assert not result.done()
    h.success_pub.publish(Bool(data=False))
    h.success_pub.publish(Bool(data=True))
    assert wait(result.done, timeout=10)
    assert result.result().result.success and result.result().result.reason == 'success'


def test_estop_holds_and_deactivates(harness, tiny_policy, wait):
    h = harness({'instruction': 'pick', 'inference_rate_hz': 5.0, 'max_tracking_error': 10.0,
                 **RELAXED}, factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    assert wait(lambda: len(h.received()) >= 2, timeout=60)
    client = h.tap.create_client(Trigger, '/iflybot_policy/estop')
    assert client.wait_for_service(timeout_sec=10)
    future = client.call_async(Trigger.Request())
    assert wait(future.done, timeout=10) and future.result().success
    stopped = time.monotonic()
    assert h.node._state_machine.current_state[0] == State.PRIMARY_STATE_INACTIVE
    assert h.node.status().state == PolicyStatus.STATE_IDLE
    time.sleep(1.5)
    with h.lock:
        late = [m for t, m in h.trajectories if t > stopped]
    assert len(late) <= 1
    for msg in late:
        assert np.all(trajectory_from_msg(msg).velocities[-1] == 0.0)


def test_remote_backend_holds_while_the_server_is_unreachable(harness, wait):
    h = harness({'inference_backend': 'remote', 'server_uri': 'ws://127.0.0.1:9',
                 'instruction': 'pick', **RELAXED})
    h.configure_and_activate(wait)
    assert wait(lambda: 'unreachable' in h.node.status().last_error, timeout=30), \
        h.node.status()
    assert h.node.status().state == PolicyStatus.STATE_HOLD
    time.sleep(1.0)
    for msg in h.received():   # only holds of the arm at rest: no motion is commanded
        traj = trajectory_from_msg(msg)
        assert np.all(traj.velocities == 0.0) and np.ptp(traj.positions, axis=0).max() == 0.0


class EeDeltaFromTiny:
    """ee_delta stand-in built on the real tiny model: its joint output squashed into small TCP
    deltas (horizon, 6) + the gripper column."""

    model_id = 'tiny as ee_delta'

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def infer(self, obs: dict) -> dict:
        out = self.inner.infer(obs)
        actions = np.asarray(out['actions'], dtype=np.float64)
        deltas = 0.01 * np.tanh(actions[:, :6] - np.asarray(obs['state'][:6]))
        return {'actions': np.hstack([deltas, actions[:, 7:8]]), 'dt': out['dt']}


@pytest.mark.flaky(reruns=1)   # twists depend on inference finishing in time on a loaded CPU
def test_ee_delta_mode_streams_bounded_twists_at_control_rate_and_zero_on_hold(
        harness, tiny_policy, wait):
    from geometry_msgs.msg import TwistStamped

    h = harness({'instruction': 'pick', 'action_mode': 'ee_delta', 'control_rate_hz': 20.0,
                 'inference_rate_hz': 5.0, **RELAXED},
                factory=lambda cfg: EeDeltaFromTiny(tiny_policy))
    from iflybot_vla_policy.ros.servo_switch import servo_command_type

    twists: list[tuple[float, TwistStamped]] = []
    h.tap.create_subscription(TwistStamped, '/servo_node/delta_twist_cmds',
                              lambda m: twists.append((time.monotonic(), m)), 50)
    srv, _ = servo_command_type()
    switched: list[int] = []    # Servo starts in JOINT_JOG: the node must ask for TWIST

    def on_switch(request, response):
        switched.append(request.command_type)
        response.success = True
        return response

    h.tap.create_service(srv, '/servo_node/switch_command_type', on_switch)
    h.configure_and_activate(wait)

    def moving() -> bool:
        return any(m.twist.linear.x or m.twist.linear.y or m.twist.linear.z for _, m in twists)

    # On a loaded CPU a chunk can arrive after its last action's time and is never executed;
    # so wait for motion rather than for a count of chunks (CI once stopped at 2 such chunks).
    assert wait(lambda: len(h.chunks) >= 2 and len(twists) >= 20 and moving(), timeout=120)
    linear = np.array([[m.twist.linear.x, m.twist.linear.y, m.twist.linear.z]
                       for _, m in twists])
    assert np.all(np.isfinite(linear))
    limit = ROBOT.max_linear_velocity * SafetyConfig().linear_velocity_scale
    assert np.linalg.norm(linear, axis=1).max() <= limit + 1e-9
    assert np.abs(linear).max() > 0.0, 'the deltas of the chunks became motion'
    assert h.trajectories == [], 'ee_delta mode publishes no joint trajectories'
    assert switched == [srv.Request.TWIST], switched    # once, when it started moving
    h.publish_joints = False
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_HOLD, timeout=10)
    held = time.monotonic()
    time.sleep(0.5)
    after = [m for t, m in twists if t > held]
    assert after and all(m.twist.linear.x == m.twist.linear.y == m.twist.linear.z == 0.0
                         for m in after[-3:])


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _serve(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-m', 'iflybot_vla_policy.cli', 'serve',
                             '--preset', 'tiny', '--port', str(port), '--device', 'cpu'],
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.mark.slow
def test_remote_backend_drives_the_arm_holds_when_the_server_dies_and_resumes(harness, wait):
    port = _free_port()
    server = _serve(port)
    try:
        h = harness({'inference_backend': 'remote', 'server_uri': f'ws://127.0.0.1:{port}',
                     'instruction': 'pick', 'inference_rate_hz': 5.0,
                     'max_tracking_error': 10.0, **RELAXED})
        h.configure_and_activate(wait)
        assert wait(lambda: h.node.status().chunks_produced >= 2, timeout=180), \
            h.node.status()
        assert h.node.runtime.stats.round_trip_ms, 'round trips are measured'
        server.kill()
        server.wait()
        assert wait(lambda: 'unreachable' in h.node.status().last_error, timeout=30)
        assert h.node.status().state == PolicyStatus.STATE_HOLD
        chunks = h.node.status().chunks_produced
        server = _serve(port)
        assert wait(lambda: h.node.status().chunks_produced >= chunks + 2, timeout=180), \
            h.node.status()
        assert h.node.status().state == PolicyStatus.STATE_RUNNING
        for msg in h.received():
            assert_valid_trajectory(msg)
    finally:
        server.kill()
        server.wait()


def test_run_policy_times_out_and_holds(harness, tiny_policy, wait):
    h = harness({'inference_rate_hz': 5.0, 'max_tracking_error': 10.0, **RELAXED},
                factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    result = h.send_goal(wait, instruction='pick', max_duration=1.0).get_result_async()
    assert wait(result.done, timeout=30)
    assert result.result().result.reason == 'timeout' and not result.result().result.success
    assert result.result().result.duration >= 1.0
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_HOLD, timeout=5)


def test_status_and_diagnostics_are_published_while_active(harness, tiny_policy, wait):
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

    h = harness({'instruction': 'pick', 'status_rate_hz': 4.0, 'max_tracking_error': 10.0,
                 **RELAXED}, factory=lambda cfg: tiny_policy)
    diagnostics: list[DiagnosticArray] = []
    h.tap.create_subscription(DiagnosticArray, '/diagnostics', diagnostics.append, 10)
    h.configure_and_activate(wait)
    assert wait(lambda: len(diagnostics) >= 2 and len(h.statuses) >= 8, timeout=30)
    with h.lock:
        stamps = [s.header.stamp.sec + s.header.stamp.nanosec * 1e-9 for s in h.statuses]
    assert np.median(np.diff(stamps)) <= 0.5            # >= 2 Hz
    status = diagnostics[-1].status[0]
    assert status.name == 'iflybot_policy'
    assert status.level in (DiagnosticStatus.OK, DiagnosticStatus.WARN)
    assert {'state', 'inference_latency_p50_ms', 'control_rate_hz'} <= \
        {kv.key for kv in status.values}


def test_trajectories_carry_their_start_time_when_stamping_is_on(harness, tiny_policy, wait):
    h = harness({'instruction': 'pick', 'stamp_trajectories': True, 'max_tracking_error': 10.0,
                 **RELAXED}, factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    assert wait(lambda: len(h.received()) >= 2, timeout=60)
    with h.lock:
        received_at, msg = h.trajectories[-1]
    now = h.tap.get_clock().now().nanoseconds * 1e-9 - (time.monotonic() - received_at)
    stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
    assert 0.0 <= now - stamp < 0.5   # stamped at its start, just before it was received


def test_a_run_started_after_the_arm_was_moved_during_a_hold_starts_from_where_it_is(
        harness, tiny_policy, wait):
    h = harness({'max_tracking_error': 0.3, **RELAXED}, factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)          # no instruction yet: active and holding
    moved = ROBOT.home.copy()
    moved[1] += 0.8                         # a sim reset, or a person, moved the arm meanwhile
    h.q = moved
    assert wait(lambda: np.allclose(h.node.runtime.q_measured[:7], moved), timeout=10)
    time.sleep(0.1)                         # holds published before the run have arrived
    before = len(h.received())
    with h.node.runtime.lock:
        # the held command still in force at the old pose, as right after a run's hold
        h.node.runtime.executor.reset(ROBOT.home, time.monotonic() + 60.0)
        h.node.runtime.instruct('pick')
        q_cmd, _ = h.node.runtime.executor.commanded(time.monotonic())
    np.testing.assert_allclose(q_cmd, moved, atol=1e-9)
    # A few control ticks: the old command would fail the tracking check at the first one.
    # (Not longer: the stand-in arm does not follow the chunks, so after ~0.2 s of motion the
    # random policy's commands drift past 0.3 rad from it, which CI's load once showed.)
    time.sleep(0.12)
    status = h.node.status()
    assert status.state != PolicyStatus.STATE_ERROR, status.last_error
    for msg in h.received()[before:]:       # the run's chunks start where the arm is
        np.testing.assert_allclose(trajectory_from_msg(msg).positions[0], moved, atol=0.05)


def test_a_run_plans_from_inputs_stamped_after_its_inputs_after_not_stale_ones(
        harness, tiny_policy, wait):
    # Through ROS, 2 cores: joint states sent before a sim reset (the old pose) arrived after
    # the next goal began; the run planned from them and failed the tracking check at 2 s.
    h = harness({'max_tracking_error': 0.3, **RELAXED}, factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    old = ROBOT.home.copy()
    old[1] += 0.8
    h.q, h.stamp_offset = old, -5.0          # still in flight from before the reset
    assert wait(lambda: np.allclose(h.node.runtime.q_measured[:7], old), timeout=10)
    reset_stamp = RosTime(nanoseconds=h.tap.get_clock().now().nanoseconds - 1_000_000_000)
    h.send_goal(wait, instruction='pick', max_duration=60.0, inputs_after=reset_stamp.to_msg())
    time.sleep(0.5)
    assert h.node.runtime.chunks_produced == 0, \
        'a chunk was planned from inputs stamped before inputs_after'
    before = len(h.received())               # holds at most (the run has not started)
    h.q, h.stamp_offset = ROBOT.home.copy(), 0.0   # the reset's pose arrives
    assert wait(lambda: h.node.runtime.chunks_produced >= 1 and len(h.received()) > before,
                timeout=30)
    # A hold at the old pose (a brake from rest: every knot the same) may still be in flight
    # after `before` was counted under load; the claim is about the first planned chunk.
    assert wait(lambda: any(np.ptp(trajectory_from_msg(m).positions, axis=0).max() > 1e-9
                            for m in h.received()[before:]), timeout=30)
    first = next(t for t in map(trajectory_from_msg, h.received()[before:])
                 if np.ptp(t.positions, axis=0).max() > 1e-9)
    assert np.abs(first.positions[0] - ROBOT.home).max() < 0.3
    status = h.node.status()
    assert status.state != PolicyStatus.STATE_ERROR, status.last_error


def test_a_run_that_starts_before_the_reset_pose_arrives_waits_for_it_instead_of_erroring(
        harness, tiny_policy, wait):
    # make demo, 2 cores: the goal landed while the joint state of the sim reset was in flight,
    # so the run began from the old pose and failed the tracking check one tick later.
    h = harness({'max_tracking_error': 0.3, **RELAXED}, factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)          # no instruction yet: active and holding at home
    h.publish_joints = False                # the reset's joint states are still in flight
    time.sleep(0.1)
    with h.node.runtime.lock:
        # the held command, at the old pose
        h.node.runtime.executor.reset(ROBOT.home, time.monotonic() + 60.0)
        h.node.runtime.instruct('pick')
    moved = ROBOT.home.copy()
    moved[1] += 0.8
    h.q = moved
    time.sleep(0.2)                         # control ticks before the new pose arrives
    assert not h.received(), 'a chunk was computed from inputs older than the run'
    h.publish_joints = True
    assert wait(lambda: np.allclose(h.node.runtime.q_measured[:7], moved), timeout=10)
    assert wait(lambda: len(h.received()) >= 1, timeout=30)
    first = trajectory_from_msg(h.received()[0])
    assert np.abs(first.positions[0] - moved).max() < 0.3   # spliced from where the arm is
    status = h.node.status()
    assert status.state != PolicyStatus.STATE_ERROR, status.last_error


# ------------------------------------------------------------------------- hostile inputs
def test_a_non_finite_joint_state_holds_with_its_cause_and_never_kills_the_node(
        harness, tiny_policy, wait):
    h = harness({'joint_state_timeout_s': 0.5, 'max_tracking_error': 10.0},
                factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    h.q = ROBOT.home.copy()
    h.q[2] = np.nan                       # idle, no goal: the case that killed the node
    time.sleep(1.5)                       # three watchdog timeouts of control ticks
    assert h.node.status().state == PolicyStatus.STATE_HOLD   # waiting for an instruction
    h.q = ROBOT.home.copy()
    h.send_goal(wait, instruction='pick', max_duration=60.0)   # alive: it runs a goal
    assert wait(lambda: len(h.received()) >= 2, timeout=60)
    h.q[4] = np.inf                       # during a run
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_HOLD, timeout=10)
    assert 'joint_states' in h.node.status().last_error
    h.q = ROBOT.home.copy()               # the input recovers, so does the node
    assert wait(lambda: h.node.status().state == PolicyStatus.STATE_RUNNING, timeout=10)
    for msg in h.received():
        assert_valid_trajectory(msg)


class WideGripper:
    """Wraps a policy; its gripper column swings beyond the hand's range (0 to 0.08 m)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.calls = 0

    def infer(self, obs: dict) -> dict:
        out = dict(self.inner.infer(obs))
        self.calls += 1
        actions = np.tile(np.asarray(obs['state'], np.float32), (len(out['actions']), 1))
        actions[:, 7] = 0.09 if self.calls % 2 else -0.01
        return {**out, 'actions': actions}


def test_every_gripper_command_is_within_the_hands_range(harness, tiny_policy, wait):
    h = harness({'instruction': 'pick', 'max_tracking_error': 10.0, 'inference_rate_hz': 5.0},
                factory=lambda cfg: WideGripper(tiny_policy))
    h.configure_and_activate(wait)
    assert wait(lambda: len(h.grippers) >= 3, timeout=60)
    widths = [g.width for g in h.grippers]
    assert all(0.0 <= w <= ROBOT.gripper.max_width for w in widths), widths


def test_an_overlong_instruction_is_refused_on_the_topic_and_as_a_goal(harness, tiny_policy,
                                                                       wait):
    from std_msgs.msg import String

    h = harness({}, factory=lambda cfg: tiny_policy)
    h.configure_and_activate(wait)
    pub = h.tap.create_publisher(String, '/vla/instruction', 10)
    assert wait(lambda: pub.get_subscription_count() > 0, timeout=10)
    pub.publish(String(data='x' * 1_000_000))
    time.sleep(0.5)
    assert h.node.status().instruction == ''
    assert h.run_policy.wait_for_server(timeout_sec=10)
    future = h.run_policy.send_goal_async(RunPolicy.Goal(instruction='y' * 5000))
    assert wait(future.done, timeout=10) and not future.result().accepted


def test_a_misspelled_parameter_is_named_with_the_closest_known_one(harness):
    h = harness({'contrl_rate_hz': 20.0, 'control_rate_hz': 40.0}, inputs=False,
                factory=lambda cfg: pytest.fail('must not load a model'))
    assert h.node.unknown_parameters() == [
        "unknown parameter 'contrl_rate_hz' ignored; did you mean 'control_rate_hz'?"]

