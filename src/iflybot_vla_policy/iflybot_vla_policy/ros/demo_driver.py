"""The demo's driver: runs episodes across tasks through ROS and taps what a user wants to see.

It talks to the running graph only through its public interfaces: `/iflybot_sim/reset`, the
recorder's services, the policy's `~/run_policy` action (or, without a checkpoint, the scripted
expert publishing the same command topics a policy does), and it records the scene camera,
the measured joints and the commanded trajectories for the video and the plot.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from iflybot_vla_msgs.action import RunPolicy
from iflybot_vla_msgs.msg import ActionChunk, PolicyStatus
from iflybot_vla_msgs.srv import ResetSim, StartEpisode, StopEpisode
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.ros.conversions import image_to_rgb, joint_positions


@dataclass
class DemoEpisode:
    task: str
    seed: int
    instruction: str
    success: bool
    duration_s: float
    latency_p50_ms: float
    bag: str
    message: str = ''


@dataclass
class Taps:
    """What the driver saw: frames for the video, measured and commanded joints for the plot."""

    frames: list[np.ndarray] = field(default_factory=list)          # (H, W, 3) uint8
    measured_t: list[float] = field(default_factory=list)
    measured_q: list[np.ndarray] = field(default_factory=list)      # (7,)
    commanded_t: list[float] = field(default_factory=list)
    commanded_q: list[np.ndarray] = field(default_factory=list)     # (7,)
    commanded_dq: list[np.ndarray] = field(default_factory=list)    # (7,), zeros when absent
    trajectory_arrivals: list[float] = field(default_factory=list)  # sim time of each message
    chunk_latency_ms: list[float] = field(default_factory=list)     # from /vla/action_chunk
    episode_starts: list[float] = field(default_factory=list)
    holds: list[str] = field(default_factory=list)     # reason of each HOLD/ERROR on /vla/status
    # per /vla/status: control timer rate (Hz) and jitter p99 (ms), image-to-trajectory p99 (ms)
    status_timing: list[tuple[float, float, float]] = field(default_factory=list)


# Holds that are the policy waiting between runs, not an interruption of one.
IDLE_HOLDS = ('waiting for an instruction', 'run_policy ended', 'run_policy canceled')

# The policy publishes /vla/status at >= 2 Hz (its status_rate_hz is validated so) whenever it is
# configured. A goal whose policy is silent this long (wall seconds) has lost its node: DDS takes
# ~20 s (Fast DDS's lease) to drop a SIGKILLed node from the graph, the status stops at once.
POLICY_SILENCE_S = 5.0


def _stamp(msg_stamp) -> float:
    return msg_stamp.sec + msg_stamp.nanosec * 1e-9


class DemoDriver(Node):
    def __init__(self, frame_every: int = 2, context: object | None = None,
                 policy_silence_s: float = POLICY_SILENCE_S) -> None:
        super().__init__('iflybot_demo', context=context)
        self.policy_silence_s = policy_silence_s
        self.robot = load_robot()
        self.taps = Taps()
        self._lock = threading.Lock()
        self._frame_every = frame_every
        self._frames_seen = 0
        self._latest_status: PolicyStatus | None = None
        self._status_heard_at: float | None = None    # time.monotonic() of the last /vla/status
        self._last_js_t = 0.0
        self.last_instruction = ''
        self._reset_stamp = Time()   # sim clock of the last reset (ResetSim.stamp)
        self.create_subscription(String, '/vla/instruction', self._on_instruction, 10)
        self.create_subscription(Image, '/scene_camera/color/image_raw', self._on_image,
                                 qos_profile_sensor_data)
        self.create_subscription(JointState, '/joint_states', self._on_joint_state, 50)
        self.create_subscription(JointTrajectory, '/fr3_arm_controller/joint_trajectory',
                                 self._on_trajectory, 10)
        self.create_subscription(PolicyStatus, '/vla/status', self._on_status, 10)
        self.create_subscription(ActionChunk, '/vla/action_chunk', self._on_chunk, 10)
        self.reset_client = self.create_client(ResetSim, '/iflybot_sim/reset')
        self.start_client = self.create_client(StartEpisode, '/iflybot_recorder/start_episode')
        self.stop_client = self.create_client(StopEpisode, '/iflybot_recorder/stop_episode')
        self.run_client = ActionClient(self, RunPolicy, '/iflybot_policy/run_policy')

    # ------------------------------------------------------------------------------ taps
    def _on_image(self, msg: Image) -> None:
        self._frames_seen += 1
        if self._frames_seen % self._frame_every == 0:
            frame = image_to_rgb(msg)
            with self._lock:
                self.taps.frames.append(frame)

    def _on_joint_state(self, msg: JointState) -> None:
        try:
            q = joint_positions(msg, self.robot.arm_joint_names)
        except (KeyError, ValueError):
            return
        t = _stamp(msg.header.stamp)
        with self._lock:
            self._last_js_t = t
            if not self.taps.measured_t or t > self.taps.measured_t[-1] + 0.02:
                self.taps.measured_t.append(t)
                self.taps.measured_q.append(q)

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        index = {name: i for i, name in enumerate(msg.joint_names)}
        if any(n not in index for n in self.robot.arm_joint_names):
            return
        columns = [index[n] for n in self.robot.arm_joint_names]
        with self._lock:
            start = _stamp(msg.header.stamp) or self._last_js_t    # stamp 0 = now
            self.taps.trajectory_arrivals.append(self._last_js_t)
            for point in msg.points:
                self.taps.commanded_t.append(start + _stamp(point.time_from_start))
                self.taps.commanded_q.append(np.array([point.positions[c] for c in columns]))
                velocities = (np.array([point.velocities[c] for c in columns])
                              if len(point.velocities) else np.zeros(len(columns)))
                self.taps.commanded_dq.append(velocities)

    def _on_chunk(self, msg: ActionChunk) -> None:
        with self._lock:
            self.taps.chunk_latency_ms.append(float(msg.inference_latency_ms))

    def _on_instruction(self, msg: String) -> None:
        self.last_instruction = msg.data

    def _on_status(self, msg: PolicyStatus) -> None:
        previous, self._latest_status = self._latest_status, msg
        self._status_heard_at = time.monotonic()
        if msg.state == PolicyStatus.STATE_RUNNING and msg.control_rate_hz > 0:
            with self._lock:
                self.taps.status_timing.append((msg.control_rate_hz, msg.control_jitter_p99_ms,
                                                msg.e2e_latency_p99_ms))
        if msg.state not in (PolicyStatus.STATE_HOLD, PolicyStatus.STATE_ERROR):
            return
        if previous is not None and (previous.state, previous.last_error) == \
                (msg.state, msg.last_error):
            return
        if msg.last_error.startswith(IDLE_HOLDS):
            return
        with self._lock:
            self.taps.holds.append(msg.last_error)

    # ------------------------------------------------------------------------------ calls
    def call(self, client, request, timeout: float = 60.0):
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f'service {client.srv_name} did not appear within {timeout} s')
        future = client.call_async(request)
        deadline = time.monotonic() + timeout
        while not future.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f'service {client.srv_name} did not answer in {timeout} s')
            time.sleep(0.01)
        return future.result()

    def reset(self, task: str, seed: int, lockstep: bool = False) -> str:
        reply = self.call(self.reset_client, ResetSim.Request(task=task, seed=seed,
                                                              lockstep=lockstep))
        if not reply.success:
            raise RuntimeError(f'simulator reset failed: {reply.message}')
        self._reset_stamp = reply.stamp   # the next run starts from the new scene's inputs
        self.mark_episode_start()
        return reply.instruction

    @property
    def reset_stamp_s(self) -> float:
        """Sim clock (s) at which the last reset's scene began."""
        return _stamp(self._reset_stamp)

    def mark_episode_start(self) -> None:
        with self._lock:
            self.taps.episode_starts.append(self._last_js_t)

    def counts(self) -> dict[str, int]:
        """Lengths of every tap, to slice out one episode afterwards."""
        with self._lock:
            return {'measured': len(self.taps.measured_t),
                    'commanded': len(self.taps.commanded_t),
                    'arrivals': len(self.taps.trajectory_arrivals),
                    'latency': len(self.taps.chunk_latency_ms),
                    'holds': len(self.taps.holds), 'status': len(self.taps.status_timing)}

    def start_episode(self, task: str, instruction: str, operator: str) -> str:
        reply = self.call(self.start_client, StartEpisode.Request(
            instruction=instruction, task=task, operator_name=operator))
        if not reply.success:
            raise RuntimeError(f'recorder refused to start: {reply.message}')
        return reply.path

    def stop_episode(self, success: bool, notes: str) -> str:
        reply = self.call(self.stop_client, StopEpisode.Request(success=success, notes=notes))
        if not reply.success:
            raise RuntimeError(f'recorder failed to stop: {reply.message}')
        return reply.message

    def run_policy(self, instruction: str, max_duration: float) -> tuple[bool, float, str]:
        """Send a RunPolicy goal and wait for its result: (success, duration, reason)."""
        if not self.run_client.wait_for_server(timeout_sec=60.0):
            raise TimeoutError('the policy action /iflybot_policy/run_policy did not appear')
        # The action appears when the node is configured and accepts goals once it is
        # active (`iflybot up` activates it right after): retry rejections for a while.
        deadline = time.monotonic() + 60.0
        while True:
            goal = self.run_client.send_goal_async(RunPolicy.Goal(
                instruction=instruction, max_duration=max_duration,
                inputs_after=self._reset_stamp))
            handle = self._wait_future(goal, 30.0, 'goal acceptance')
            if handle.accepted:
                break
            if time.monotonic() > deadline:
                raise RuntimeError('the policy rejected the goal for 60 s (is it active? see '
                                   'its log)')
            time.sleep(0.5)
        result = self._wait_result(handle, max_duration * 4 + 60.0)
        return bool(result.success), float(result.duration), result.reason

    def _wait_result(self, handle, timeout: float):
        """The goal's result; raises within seconds once the policy node is gone, rather than
        waiting out `timeout` for a result that cannot come."""
        future = handle.get_result_async()
        accepted_at = time.monotonic()
        deadline, next_check = accepted_at + timeout, accepted_at
        while not future.done():
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError('timed out waiting for the policy result')
            if now >= next_check:
                next_check = now + 0.25
                problem = self._policy_gone(accepted_at, now)
                if problem:
                    handle.cancel_goal_async()    # a hung node that recovers stops the run
                    raise RuntimeError(f'{problem} during a run_policy goal; the policy node '
                                       'died or hung: see its log')
            time.sleep(0.02)
        return future.result().result

    def _policy_gone(self, accepted_at: float, now: float) -> str:
        """Why the running goal's server is gone ('' while it looks alive)."""
        if not self.run_client.server_is_ready():
            return 'the action server /iflybot_policy/run_policy disappeared'
        heard = self._status_heard_at
        if heard is not None:     # only a policy that publishes its status can fall silent
            silent = now - max(heard, accepted_at)
            if silent > self.policy_silence_s:
                return f'no /vla/status from the policy for {silent:.1f} s'
        return ''

    def latency_p50(self) -> float:
        status = self._latest_status
        return float(status.inference_latency_p50_ms) if status is not None else float('nan')

    @staticmethod
    def _wait_future(future, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while not future.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f'timed out waiting for {what}')
            time.sleep(0.02)
        return future.result()


def spin_in_background(node: Node) -> tuple[SingleThreadedExecutor, threading.Thread]:
    """One executor thread: rclpy's MultiThreadedExecutor took a third of a core here, which the
    graph it measures needed (docs/realtime.md)."""
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    return executor, thread


def init() -> None:
    rclpy.init()


def shutdown(node: Node, executor: SingleThreadedExecutor) -> None:
    executor.shutdown()
    node.destroy_node()
    rclpy.try_shutdown()
