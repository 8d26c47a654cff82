"""`iflybot_policy`: lifecycle node that runs the VLA at control rate and moves the arm safely.

configure: validate parameters (a bad one fails the transition naming it), load the checkpoint
(or build `preset` with random weights) or connect to a policy server, warm up.
activate: control starts; deactivate: hold position. Threads: a control timer (watchdog, status,
gripper, ee_delta twists) that never waits for the model, and one inference worker that takes
the newest observation, runs the model, vets the chunk (safety.py), splices it onto what is
executing (chunking.py) and publishes one JointTrajectory per chunk. Model math, safety and
splicing live in the core; this module converts and wires.
"""
from __future__ import annotations

import difflib
import math
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TwistStamped
from iflybot_vla_msgs.action import RunPolicy
from iflybot_vla_msgs.msg import ActionChunk, GripperCommand, PolicyStatus
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import qos_profile_sensor_data
from rclpy.task import Future
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory
from visualization_msgs.msg import MarkerArray

from iflybot_vla_policy.chunking import STRATEGIES, ChunkExecutor, ChunkPlan, ExecutionConfig
from iflybot_vla_policy.eval.metrics import jitter, missed_ticks
from iflybot_vla_policy.robot import RobotSpec, load_robot
from iflybot_vla_policy.ros.conversions import (
    action_chunk_msg,
    gripper_command_msg,
    image_to_rgb,
    joint_positions,
    path_markers,
    robot_state,
    trajectory_msg,
    twist_msg,
)
from iflybot_vla_policy.safety import SafetyConfig, SafetyFilter, Trajectory, Watchdog

IDLE, RUNNING, HOLD, ERROR = (PolicyStatus.STATE_IDLE, PolicyStatus.STATE_RUNNING,
                              PolicyStatus.STATE_HOLD, PolicyStatus.STATE_ERROR)
STATE_NAMES = {IDLE: 'IDLE', RUNNING: 'RUNNING', HOLD: 'HOLD', ERROR: 'ERROR'}
# Requests follow camera frames: one may come this early (s) so that frame timing jitter does
# not push it to the frame after.
REQUEST_SLACK_S = 0.02
# An instruction longer than this is refused: every /vla/status repeats it, and the model's
# tokenizer keeps only its first max_text_tokens anyway (a 1 MB one stalled inference).
MAX_INSTRUCTION_CHARS = 2000


# --------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class NodeConfig:
    """Validated parameters of the node (see src/iflybot_bringup/config/policy.yaml)."""

    checkpoint: str = ''
    preset: str = 'tiny'
    seed: int = 0
    noise_scale: float = -1.0
    device: str = 'cpu'
    torch_threads: int = 0
    inference_process: bool = True
    inference_backend: str = 'local'
    server_uri: str = 'ws://127.0.0.1:8000'
    api_key: str = ''
    instruction: str = ''
    action_mode: str = 'joint'
    control_rate_hz: float = 50.0
    inference_rate_hz: float = 5.0
    status_rate_hz: float = 5.0
    warmup_inferences: int = 1
    execution_strategy: str = 'rtc'
    commit_latency_s: float = 0.05
    ensemble_decay: float = 0.01
    camera_names: tuple[str, ...] = ('scene_camera', 'wrist_camera')
    camera_topics: tuple[str, ...] = ('/scene_camera/color/image_raw',
                                      '/wrist_camera/color/image_raw')
    joint_state_topic: str = '/joint_states'
    arm_joint_names: tuple[str, ...] = ()
    finger_joint_names: tuple[str, ...] = ()
    trajectory_topic: str = '/fr3_arm_controller/joint_trajectory'
    stamp_trajectories: bool = False
    twist_topic: str = '/servo_node/delta_twist_cmds'
    twist_frame: str = 'fr3_link0'
    gripper_topic: str = '/vla/gripper_command'
    task_success_topic: str = '/sim/task_success'
    gripper_speed: float = 0.05
    gripper_force: float = 20.0
    gripper_deadband: float = 0.005
    grasp_width: float = 0.01
    velocity_scale: float = 0.5
    acceleration_scale: float = 0.5
    position_margin: float = 0.05
    max_step: float = 0.5
    hold_on_large_step: bool = False
    max_tracking_error: float = 0.3
    workspace_margin: float = 0.0
    joint_state_timeout_s: float = 0.25
    camera_timeout_s: float = 0.5


DESCRIPTIONS: dict[str, str] = {
    'checkpoint': 'checkpoint directory (Policy.from_checkpoint); empty: build `preset`',
    'preset': 'model preset built with random weights when checkpoint is empty (tiny, ...)',
    'seed': 'seed of the random weights (preset) and of the sampling noise',
    'noise_scale': 'std of the flow starting noise in [0, 1]: 1 samples, 0 is deterministic; '
                   "negative: the checkpoint's bundle.yaml inference.noise_scale, else 1",
    'device': 'torch device of the local model: cpu, cuda, cuda:0, ...',
    'torch_threads': 'CPU threads of a local model; 0: torch default (one per core)',
    'inference_process': 'local model in a child process (true: the executor never waits for '
                         'the model interpreter lock) or on a thread of this one (false)',
    'inference_backend': 'local (model in this process) or remote (iflybot serve / openpi)',
    'server_uri': 'websocket URI of the policy server (inference_backend: remote)',
    'api_key': 'API key sent as "Authorization: Api-Key <key>" (remote); empty: none',
    'instruction': 'instruction to start with; empty waits for /vla/instruction or a goal',
    'action_mode': 'joint (JointTrajectory) or ee_delta (TwistStamped to MoveIt Servo)',
    'control_rate_hz': 'rate of the control timer (watchdog, gripper, ee_delta twists)',
    'inference_rate_hz': 'chunks requested per second (one JointTrajectory each)',
    'status_rate_hz': 'rate of /vla/status (>= 2) ; /diagnostics runs at 1 Hz',
    'warmup_inferences': 'inferences run on a blank observation during configure',
    'execution_strategy': 'how a new chunk joins the executing one: rtc, ensemble or naive',
    'commit_latency_s': 's after a splice before the new command acts (rtc freezes it)',
    'ensemble_decay': 'temporal ensembling weight exp(-m i) of the i-th oldest chunk',
    'camera_names': 'camera names the model expects, in the order of camera_topics',
    'camera_topics': 'sensor_msgs/Image topics, one per camera name',
    'joint_state_topic': 'sensor_msgs/JointState topic with arm and finger joints',
    'arm_joint_names': 'arm joints in action order; empty: from config/robot/fr3.yaml',
    'finger_joint_names': 'finger joints summed into the gripper width; empty: fr3.yaml',
    'trajectory_topic': 'JointTrajectoryController topic (joint mode)',
    'stamp_trajectories': 'stamp trajectories with their start time (controller on this '
                          'clock) instead of zero (start on receipt)',
    'twist_topic': 'MoveIt Servo twist topic (ee_delta mode)',
    'twist_frame': 'frame of the twist commands (the robot base)',
    'gripper_topic': 'iflybot_vla_msgs/GripperCommand topic, published on change',
    'task_success_topic': 'std_msgs/Bool that ends a run_policy goal with success: a true '
                          'after a false received during the goal',
    'gripper_speed': 'finger speed of gripper commands, m/s',
    'gripper_force': 'grasp force of gripper commands, N',
    'gripper_deadband': 'm the width target must change by before a new gripper command',
    'grasp_width': 'targets at or below this width (m) are sent as grasps',
    'velocity_scale': 'fraction of the joint velocity limits (fr3.yaml) trajectories may use',
    'acceleration_scale': 'fraction of the joint acceleration limits',
    'position_margin': 'rad kept clear of every joint position limit',
    'max_step': 'rad a target may lie from the measured state beyond the velocity allowance',
    'hold_on_large_step': 'true: hold on a target beyond max_step; false: clamp it',
    'max_tracking_error': 'rad between command and measurement before ERROR and hold',
    'workspace_margin': 'm the TCP workspace box of fr3.yaml is shrunk by',
    'joint_state_timeout_s': 'hold when the newest joint state is older than this',
    'camera_timeout_s': 'hold when the newest image of a camera is older than this',
}

_CHOICES = {'inference_backend': ('local', 'remote'), 'action_mode': ('joint', 'ee_delta'),
            'execution_strategy': STRATEGIES}
_POSITIVE = ('control_rate_hz', 'inference_rate_hz', 'gripper_speed', 'max_step',
             'max_tracking_error', 'joint_state_timeout_s', 'camera_timeout_s')
_NON_NEGATIVE = ('commit_latency_s', 'ensemble_decay', 'gripper_force', 'gripper_deadband',
                 'grasp_width', 'position_margin', 'workspace_margin', 'warmup_inferences',
                 'torch_threads')


def parse_config(values: dict[str, Any], robot: RobotSpec) -> NodeConfig:
    """Parameter values -> NodeConfig; ValueError naming the parameter on any bad value."""
    out: dict[str, Any] = {}
    for f in fields(NodeConfig):
        default = getattr(NodeConfig, f.name)
        value = values.get(f.name, default)
        try:
            out[f.name] = _coerce(value, default)
        except (TypeError, ValueError):
            raise ValueError(f'parameter {f.name}: expected {type(default).__name__}, got '
                             f'{value!r}') from None
    for name, choices in _CHOICES.items():
        if out[name] not in choices:
            raise ValueError(f'parameter {name}: {out[name]!r} is not one of {list(choices)}')
    for name in _POSITIVE:
        if not out[name] > 0:
            raise ValueError(f'parameter {name}: must be > 0, got {out[name]}')
    for name in _NON_NEGATIVE:
        if not out[name] >= 0:
            raise ValueError(f'parameter {name}: must be >= 0, got {out[name]}')
    if out['status_rate_hz'] < 2.0:
        raise ValueError(f'parameter status_rate_hz: must be >= 2, got {out["status_rate_hz"]}')
    if out['inference_rate_hz'] > out['control_rate_hz']:
        raise ValueError('parameter inference_rate_hz: must not exceed control_rate_hz')
    if not (out['noise_scale'] < 0 or 0 <= out['noise_scale'] <= 1):   # NaN fails both
        raise ValueError(f'parameter noise_scale: must be in [0, 1] (or negative for the '
                         f'checkpoint\'s), got {out["noise_scale"]}')
    for name in ('velocity_scale', 'acceleration_scale'):
        if not 0 < out[name] <= 1:
            raise ValueError(f'parameter {name}: must be in (0, 1], got {out[name]}')
    if len(out['camera_names']) != len(out['camera_topics']) or not out['camera_names']:
        raise ValueError('parameter camera_topics: needs one topic per camera_names entry, got '
                         f'{list(out["camera_topics"])} for {list(out["camera_names"])}')
    if not out['arm_joint_names']:
        out['arm_joint_names'] = robot.arm_joint_names
    if not out['finger_joint_names']:
        out['finger_joint_names'] = robot.finger_joint_names
    if len(out['arm_joint_names']) != robot.n_joints:
        raise ValueError(f'parameter arm_joint_names: needs {robot.n_joints} names, got '
                         f'{list(out["arm_joint_names"])}')
    if out['inference_backend'] == 'local' and not (out['checkpoint'] or out['preset']):
        raise ValueError('parameter checkpoint: set checkpoint or preset')
    if out['inference_backend'] == 'remote' and not out['server_uri'].startswith(('ws://',
                                                                                 'wss://')):
        raise ValueError(f'parameter server_uri: must start with ws:// or wss://, got '
                         f'{out["server_uri"]!r}')
    return NodeConfig(**out)


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ('true', 'false'):
            return value.lower() == 'true'
        raise ValueError(value)
    if isinstance(default, int):
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError(value)
        return int(float(value))
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError(value)
        result = float(value)
        if not math.isfinite(result):
            raise ValueError(value)
        return result
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(',', ' ').split() if v]
        if not all(isinstance(v, str) for v in value):
            raise ValueError(value)
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError(value)
    return value


def safety_config(cfg: NodeConfig) -> SafetyConfig:
    return SafetyConfig(velocity_scale=cfg.velocity_scale,
                        acceleration_scale=cfg.acceleration_scale,
                        position_margin=cfg.position_margin, max_step=cfg.max_step,
                        hold_on_large_step=cfg.hold_on_large_step,
                        max_tracking_error=cfg.max_tracking_error,
                        workspace_margin=cfg.workspace_margin)


# ------------------------------------------------------------------------------------ worker
@dataclass
class _Request:
    generation: int
    t_obs: float                 # node time (PolicyNode.now_s) of the snapshot
    obs_stamp: float             # oldest image header stamp (s, ROS clock), 0 if unknown
    images: dict[str, Image]
    joint_state: JointState
    instruction: str


class _InferenceWorker:
    """One background thread running `handle(request)`; submit() never blocks."""

    def __init__(self, handle: Callable[[_Request], None]) -> None:
        self._handle = handle
        self._cv = threading.Condition()
        self._request: _Request | None = None
        self._busy = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name='inference', daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, request: _Request) -> bool:
        with self._cv:
            if self._busy:
                return False
            self._busy = True
            self._request = request
            self._cv.notify()
            return True

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._request is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                request, self._request = self._request, None
            try:
                self._handle(request)
            except Exception:  # noqa: BLE001 - the worker must outlive any single request
                traceback.print_exc()
            finally:
                with self._cv:
                    self._busy = False


# -------------------------------------------------------------------------------------- node
class PolicyNode(LifecycleNode):
    """See the module docstring. `policy_factory(config) -> object with infer(obs)` replaces
    model loading (tests inject wrappers through it)."""

    def __init__(self, policy_factory: Callable[[NodeConfig], Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__('iflybot_policy', **kwargs)
        self._policy_factory = policy_factory
        self.robot = load_robot()
        for f in fields(NodeConfig):
            default = getattr(NodeConfig, f.name)
            if isinstance(default, tuple):
                default = list(default) or ['']   # an empty list has no type in ROS
            self.declare_parameter(f.name, default, ParameterDescriptor(
                description=DESCRIPTIONS[f.name], dynamic_typing=True))
        self.config: NodeConfig | None = None
        self.configure_error = ''
        self._lock = threading.Lock()
        self._handles: list[Any] = []
        self._worker: _InferenceWorker | None = None
        self._policy: Any = None
        self._active = False
        self._state = IDLE
        self._last_error = ''
        self._hold_cause = ''          # what the current HOLD waits for: input|server|user|''
        self._generation = 0
        self._instruction = ''
        self._images: dict[str, Image] = {}
        self._image_stamps: dict[str, float] = {}
        self._frame_times: dict[str, float] = {}   # header stamp, or node time if unstamped
        self._joint_state: JointState | None = None
        self._q_measured: np.ndarray | None = None
        self._last_frame_time = self._retry_at = -math.inf
        # frames received per camera, and the counts at the last request (counted, not
        # compared by stamp: some drivers do not stamp their images)
        self._frames: dict[str, int] = {}
        self._frames_used: dict[str, int] = {}
        self._gripper_sent: tuple[float, bool] | None = None
        self._twist = np.zeros(6)
        self._chunk_dt = 0.1
        self._chunks = 0
        self._success_since = -math.inf   # node time of the last task_success=True
        # False once a goal starts, True when a task_success=False arrives during it: a True
        # still queued from the episode before the simulator's reset does not end the goal
        self._success_armed = False
        self._goal_token = 0
        self._run_start: float | None = None   # a run waits for inputs newer than this
        self._inputs_after = 0.0   # ... and stamped at or after this (RunPolicy.inputs_after)
        self.inference_ms: deque[float] = deque(maxlen=200)
        self.e2e_latency_ms: deque[float] = deque(maxlen=200)
        self.round_trip_ms: deque[float] = deque(maxlen=200)
        self.tick_times: deque[float] = deque(maxlen=1000)   # node time of control ticks
        self._torn_down = False
        self._missed_ticks = 0   # control ticks skipped while active
        self._tick_waiters: list[Future] = []   # running goals, woken by each control tick
        self._model_id = ''

    def now_s(self) -> float:
        """Seconds on the clock the controller runs on: the simulator's with use_sim_time (a
        slow simulator slows everything together, freshness included), else monotonic."""
        clock = self.get_clock()
        if clock.ros_time_is_active:
            return clock.now().nanoseconds * 1e-9
        return time.monotonic()

    # ------------------------------------------------------------------------ lifecycle
    def unknown_parameters(self) -> list[str]:
        """Params-file keys that are no parameter of this node (typos), each named with the
        closest known name, so that they are not silently ignored."""
        known = [f.name for f in fields(NodeConfig)]
        problems = []
        for name in sorted(getattr(self, '_parameter_overrides', {})):
            if self.has_parameter(name) or name.startswith('qos_overrides'):
                continue
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            problems.append(f"unknown parameter '{name}' ignored{hint}")
        return problems

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        for problem in self.unknown_parameters():
            self.get_logger().warning(problem)
        values = {f.name: self.get_parameter(f.name).value for f in fields(NodeConfig)}
        for name in ('arm_joint_names', 'finger_joint_names'):
            values[name] = [v for v in (values[name] or []) if v]
        try:
            cfg = parse_config(values, self.robot)
            self.safety = SafetyFilter(self.robot, safety_config(cfg))
            execution = ExecutionConfig(strategy=cfg.execution_strategy,
                                        commit_latency=cfg.commit_latency_s,
                                        ensemble_decay=cfg.ensemble_decay)
        except ValueError as exc:
            return self._fail_configure(str(exc))
        self.config = cfg
        self.executor_ = ChunkExecutor(self.safety, execution)
        self.delta_plan = ChunkPlan(execution)
        self.watchdog = Watchdog({'joint_states': cfg.joint_state_timeout_s,
                                  **{c: cfg.camera_timeout_s for c in cfg.camera_names}})
        try:
            self._policy = self._load_policy(cfg)
        except Exception as exc:  # noqa: BLE001 - any loading failure fails configure
            self._policy = None
            name = 'server_uri' if cfg.inference_backend == 'remote' else (
                'checkpoint' if cfg.checkpoint else 'preset')
            return self._fail_configure(f'parameter {name}: cannot load the policy: '
                                        f'{type(exc).__name__}: {exc}')
        self._instruction = cfg.instruction
        self._create_interfaces(cfg)
        self._torn_down = False
        self._worker = _InferenceWorker(self._run_inference)
        self.configure_error = ''
        self.get_logger().info(f'configured: {self._model_id}, {cfg.action_mode} mode, '
                               f'{cfg.execution_strategy}, {cfg.inference_backend} inference')
        return TransitionCallbackReturn.SUCCESS

    def _fail_configure(self, message: str) -> TransitionCallbackReturn:
        self.configure_error = message
        self.get_logger().error(f'configure failed: {message}')
        return TransitionCallbackReturn.FAILURE

    def _load_policy(self, cfg: NodeConfig) -> Any:
        if self._policy_factory is not None:
            policy = self._policy_factory(cfg)
            self._model_id = getattr(policy, 'model_id', type(policy).__name__)
        elif cfg.inference_backend == 'remote':
            from iflybot_vla_policy.remote import RemotePolicy
            policy = RemotePolicy(cfg.server_uri, api_key=cfg.api_key or None)
            self._model_id = cfg.server_uri
            try:
                meta = policy.connect()
                self._chunk_dt = float(meta.get('dt', self._chunk_dt))
            except ConnectionError as exc:   # hold until it answers; do not fail configure
                self.get_logger().warning(f'policy server not reachable yet: {exc}')
            return policy
        else:
            from iflybot_vla_policy.inference_process import (
                InferenceProcess,
                PolicySpec,
                load_policy,
            )

            spec = PolicySpec(checkpoint=cfg.checkpoint, preset=cfg.preset, seed=cfg.seed,
                              device=cfg.device, torch_threads=cfg.torch_threads,
                              noise_scale=cfg.noise_scale if cfg.noise_scale >= 0 else None)
            policy = InferenceProcess(spec) if cfg.inference_process else load_policy(spec)
            self._model_id = cfg.checkpoint or f'{cfg.preset} (random weights)'
        for _ in range(cfg.warmup_inferences):
            out = policy.infer(self._blank_observation(cfg))
            self._chunk_dt = float(out.get('dt', self._chunk_dt))
        return policy

    def _blank_observation(self, cfg: NodeConfig) -> dict:
        blank = np.zeros((64, 64, 3), dtype=np.uint8)
        state = np.append(self.robot.home, self.robot.gripper.max_width / 2)
        return {'images': {c: blank for c in cfg.camera_names},
                'state': state.astype(np.float32), 'instruction': 'warm up'}

    def _create_interfaces(self, cfg: NodeConfig) -> None:
        sensors = ReentrantCallbackGroup()
        control = MutuallyExclusiveCallbackGroup()
        calls = ReentrantCallbackGroup()
        h = self._handles
        self.trajectory_pub = self.create_publisher(JointTrajectory, cfg.trajectory_topic, 10)
        self.twist_pub = self.create_publisher(TwistStamped, cfg.twist_topic, 10)
        self.gripper_pub = self.create_publisher(GripperCommand, cfg.gripper_topic, 10)
        self.chunk_pub = self.create_publisher(ActionChunk, '/vla/action_chunk', 10)
        self.status_pub = self.create_publisher(PolicyStatus, '/vla/status', 10)
        self.marker_pub = self.create_publisher(MarkerArray, '/vla/markers', 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        h += [self.trajectory_pub, self.twist_pub, self.gripper_pub, self.chunk_pub,
              self.status_pub, self.marker_pub, self.diag_pub]
        for name, topic in zip(cfg.camera_names, cfg.camera_topics, strict=True):
            h.append(self.create_subscription(
                Image, topic, lambda msg, n=name: self._on_image(n, msg),
                qos_profile_sensor_data, callback_group=sensors))
        h.append(self.create_subscription(JointState, cfg.joint_state_topic,
                                          self._on_joint_state, qos_profile_sensor_data,
                                          callback_group=sensors))
        h.append(self.create_subscription(String, '/vla/instruction', self._on_instruction, 10,
                                          callback_group=sensors))
        h.append(self.create_subscription(Bool, cfg.task_success_topic, self._on_success, 10,
                                          callback_group=sensors))
        h.append(self.create_timer(1.0 / cfg.control_rate_hz, self._on_control_tick,
                                   callback_group=control))
        h.append(self.create_timer(1.0 / cfg.status_rate_hz, self._publish_status,
                                   callback_group=calls))
        h.append(self.create_timer(1.0, self._publish_diagnostics, callback_group=calls))
        h.append(self.create_service(Trigger, '~/estop', self._on_estop, callback_group=calls))
        self.action_server = ActionServer(
            self, RunPolicy, '~/run_policy', execute_callback=self._execute_goal,
            goal_callback=self._on_goal, cancel_callback=lambda _goal: CancelResponse.ACCEPT,
            callback_group=calls)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            q = self._q_measured
            if q is None:
                self.get_logger().warning('activating without a joint state: holding until one '
                                          'arrives')
            self._reset_command(q)
            self._active = True
            self._generation += 1
            self._last_frame_time = self._retry_at = -math.inf
            self._run_start = self.now_s()
            self._set_state(RUNNING if self._instruction else HOLD,
                            '' if self._instruction else 'waiting for an instruction',
                            '' if self._instruction else 'user')
        self.get_logger().info('active')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self._hold('deactivated', cause='user')
            self._active = False
            self._state = IDLE
        self.get_logger().info('deactivated: holding position')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            if self._active and self.config is not None:
                self._hold('shutdown', cause='user')
            self._active = False
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self) -> None:
        self._torn_down = True
        self._wake_goals()   # a goal still running sees the node inactive and ends
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if getattr(self, 'action_server', None) is not None:
            self.action_server.destroy()
            self.action_server = None
        for handle in self._handles:
            destroy = {'Publisher': self.destroy_publisher,
                       'Subscription': self.destroy_subscription,
                       'Timer': self.destroy_timer, 'Service': self.destroy_service}
            destroy[type(handle).__name__](handle)
        self._handles.clear()
        close = getattr(self._policy, 'close', None)
        if callable(close):
            close()
        self._policy = None
        self.config = None

    # ------------------------------------------------------------------------- inputs
    def _on_image(self, name: str, msg: Image) -> None:
        now = self.now_s()
        with self._lock:
            self._images[name] = msg
            self._frames[name] = self._frames.get(name, 0) + 1
            self._image_stamps[name] = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            self._frame_times[name] = self._image_stamps[name] or now
            if self.config is None:
                return
            self.watchdog.feed(name, now)
            if self._fresh_images():
                # Plan on a frame as soon as it is complete instead of at the next tick: the
                # frame's age at the request is what the image-to-trajectory latency adds.
                self._step(now, outputs=False)

    def _on_joint_state(self, msg: JointState) -> None:
        now = self.now_s()
        cfg = self.config
        if cfg is None:
            return
        try:
            q = joint_positions(msg, cfg.arm_joint_names)
            joint_positions(msg, cfg.finger_joint_names)
        except (KeyError, ValueError) as exc:
            self.get_logger().warning(f'ignoring joint state: {exc}',
                                      throttle_duration_sec=5.0)
            return
        with self._lock:
            self._joint_state = msg
            self._q_measured = q
            self.watchdog.feed('joint_states', now)

    def _on_instruction(self, msg: String) -> None:
        if len(msg.data) > MAX_INSTRUCTION_CHARS:
            self.get_logger().error(f'instruction refused: {len(msg.data)} characters (limit '
                                    f'{MAX_INSTRUCTION_CHARS})', throttle_duration_sec=2.0)
            return
        with self._lock:
            self._start_instruction(msg.data)
            self._step(self.now_s(), outputs=False)   # a paused (lockstep) clock has no ticks

    def _inputs_current(self) -> bool:
        """(lock held) Whether the joint state and every image are stamped at or after the
        run's `inputs_after` (true when it is 0)."""
        if self._inputs_after <= 0:
            return True
        js = self._joint_state.header.stamp
        stamps = [js.sec + js.nanosec * 1e-9,
                  *(self._image_stamps.get(name, -math.inf) for name in self.config.camera_names)]
        if min(stamps) >= self._inputs_after:
            return True
        self.get_logger().info(f'run_policy: waiting for inputs stamped after '
                               f'{self._inputs_after:.3f} s', throttle_duration_sec=2.0)
        return False

    def _on_success(self, msg: Bool) -> None:
        with self._lock:
            if not msg.data:
                self._success_armed = True
            elif self._success_armed:
                self._success_since = self.now_s()

    def _start_instruction(self, text: str) -> None:
        """(lock held) Run with a new instruction; resumes from a user hold."""
        self._instruction = text
        self._generation += 1
        if self._active and self._state in (HOLD, ERROR, RUNNING):
            if text:
                if self._state != RUNNING:
                    self._start_from_measured()
                    self._run_start = self.now_s()
                self._set_state(RUNNING, '', '')
                self._last_frame_time = self._retry_at = -math.inf
            else:
                self._hold('waiting for an instruction', cause='user')

    def _start_from_measured(self) -> None:
        """(lock held) A run starts from where the arm is when the held command has finished
        (a sim reset or a person may have moved the arm within the tracking tolerance: planning
        from the old command made the first trajectory jump there) or when the arm is far from
        it (instead of failing the tracking check on the first tick)."""
        if (self.config is None or self.config.action_mode != 'joint'
                or self._q_measured is None or self.executor_.command is None):
            return
        now = self.now_s()
        q_cmd, _ = self.executor_.commanded(now)
        if now >= self.executor_.command.end or \
                self.safety.tracking_error_reason(q_cmd, self._q_measured):
            self.executor_.reset(self._q_measured, now)

    # ------------------------------------------------------------------------- control
    def _on_control_tick(self) -> None:
        now = self.now_s()
        if self.tick_times and self._active:
            self._missed_ticks += missed_ticks([self.tick_times[-1], now],
                                               1.0 / self.config.control_rate_hz)
        self.tick_times.append(now)
        self._wake_goals()
        if not self._lock.acquire(blocking=False):
            return   # the worker is splicing; the controller keeps executing the trajectory
        try:
            self._step(now, outputs=True)
        finally:
            self._lock.release()

    def _fresh_images(self) -> bool:
        """(lock held) Every camera has a frame newer than those of the last request."""
        return all(self._frames.get(c, 0) > self._frames_used.get(c, 0)
                   for c in self.config.camera_names)

    def _step(self, now: float, outputs: bool) -> None:
        """(lock held) Watchdog, run start, tracking check and chunk requests; with `outputs`
        (the control tick) also the gripper and ee_delta twists. Runs on every tick and when a
        camera frame completes a new observation."""
        if not self._active or self.config is None:
            return
        if self._q_measured is not None and self.executor_.command is None:
            self._reset_command(self._q_measured)
        stale = self.watchdog.stale_reason(now)
        if stale:
            if self._state == RUNNING:
                self._hold(stale, cause='input')
            elif self._state == HOLD and self._hold_cause not in ('user', 'input', 'server'):
                # (a server hold stays one: fresh inputs alone would resume it into RUNNING
                # with the server still down, as a loaded test machine showed)
                self._set_state(HOLD, stale, 'input')
            if outputs and self.config.action_mode == 'ee_delta':   # explicit zeros
                self._command_gripper_and_twist(now)
            return
        if self._state == HOLD and self._hold_cause == 'input':
            self._set_state(RUNNING, '', '')   # inputs fresh again: resume
        if self._run_start is not None and self._state == RUNNING:
            # A run's first check and first chunk use inputs that arrived after it began:
            # the joint state of a sim reset may still be in flight when the goal lands.
            # With inputs_after the stamps decide (a lockstep simulator's clock stands still,
            # so nothing arrives 'after' on it); without, arrival after the run began does.
            current = self._inputs_current() if self._inputs_after > 0 else \
                self.watchdog.fed_since(self._run_start)
            if not current:
                return
            self._run_start, self._inputs_after = None, 0.0
            self._start_from_measured()
        command = self.executor_.command
        if self.config.action_mode == 'joint' and command is not None:
            if self._state != RUNNING and now > command.end:
                # At rest and not running: the measurement is the truth (a sim reset or
                # a person may have moved the arm); the next run starts from it.
                self.executor_.reset(self._q_measured, now)
            q_cmd, _ = self.executor_.commanded(now)
            reason = self.safety.tracking_error_reason(q_cmd, self._q_measured)
            if reason and self._state == RUNNING:
                self._hold(reason, cause='error', state=ERROR)
                return
        # While the server is down the robot holds but requests go on: they reconnect
        # (the remote client paces them with its backoff).
        wants_chunks = self._state == RUNNING or (self._state == HOLD
                                                  and self._hold_cause == 'server')
        period = 1.0 / self.config.inference_rate_hz
        frame_time = min(self._frame_times.get(c, -math.inf) for c in self.config.camera_names)
        # The cadence follows the frames' own times: a request made late (worker busy) does
        # not push the next one off its frame.
        if wants_chunks and not self._worker.busy and self._fresh_images() and \
                now >= self._retry_at and \
                frame_time - self._last_frame_time >= period - min(REQUEST_SLACK_S, period / 4):
            self._submit(now, frame_time)
        if outputs:
            self._command_gripper_and_twist(now)

    def _wake_goals(self) -> None:
        """Resume the running goals' coroutines: they re-check their end conditions once per
        control tick without holding an executor thread."""
        with self._lock:
            waiters, self._tick_waiters = self._tick_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _next_tick(self) -> Future:
        future = Future()
        with self._lock:
            self._tick_waiters.append(future)
        return future

    def _submit(self, now: float, frame_time: float) -> None:
        """(lock held) Hand the newest observation to the worker."""
        cfg = self.config
        stamps = [self._image_stamps.get(c, 0.0) for c in cfg.camera_names]
        request = _Request(self._generation, now, min(stamps),
                           {c: self._images[c] for c in cfg.camera_names}, self._joint_state,
                           self._instruction)
        if self._worker.submit(request):
            self._last_frame_time = frame_time
            self._frames_used = dict(self._frames)

    def _command_gripper_and_twist(self, now: float) -> None:
        """(lock held) Gripper on change; ee_delta twist at control rate."""
        cfg = self.config
        if cfg.action_mode == 'joint':
            width = self.executor_.gripper_at(now) if self._state == RUNNING else None
        else:
            values = self.delta_plan.at(now) if self._state == RUNNING else None
            twist = np.zeros(6)
            if values is not None and now <= self.delta_plan.end:
                twist = values[:6] / self._chunk_dt
            self._twist = self.safety.limit_twist(self._twist, twist, 1.0 / cfg.control_rate_hz)
            self.twist_pub.publish(twist_msg(self._twist, self.get_clock().now().to_msg(),
                                             cfg.twist_frame))
            width = None if values is None else float(values[6])
        if width is None or not math.isfinite(width):
            return
        # Interpolating between chunk values can step outside the hand's range (-0.0046 and
        # 0.0825 m were seen): what is published stays within it.
        width = min(max(width, 0.0), self.robot.gripper.max_width)
        grasp = width <= cfg.grasp_width
        last = self._gripper_sent
        if last is None or grasp != last[1] or abs(width - last[0]) > cfg.gripper_deadband:
            self._gripper_sent = (width, grasp)
            self.gripper_pub.publish(gripper_command_msg(
                width, cfg.gripper_speed, cfg.gripper_force, grasp,
                self.get_clock().now().to_msg()))

    # ------------------------------------------------------------------------- holding
    def _reset_command(self, q: np.ndarray | None) -> None:
        self.executor_.plan.clear()
        self.delta_plan.clear()
        if q is not None:
            self.executor_.reset(q, self.now_s())

    def _set_state(self, state: int, error: str, cause: str) -> None:
        if state != self._state or error != self._last_error:
            text = f'{STATE_NAMES[state]}' + (f': {error}' if error else '')
            if state == ERROR:   # rclpy wants one severity per call site
                self.get_logger().error(text)
            else:
                self.get_logger().info(text)
        self._state, self._last_error, self._hold_cause = state, error, cause

    def _hold(self, reason: str, cause: str, state: int = HOLD) -> None:
        """(lock held) Stop from the current command and drop in-flight chunks."""
        self._generation += 1
        self._set_state(state, reason, cause)
        self._brake()

    def _publish_trajectory(self, trajectory: Trajectory) -> None:
        """Stamp zero (the controller starts on receipt) or, with stamp_trajectories, the
        node-clock time of the trajectory's start, which removes the transport delay."""
        stamp = None
        if self.config.stamp_trajectories:
            offset = trajectory.start - self.now_s()
            stamp = (self.get_clock().now() + Duration(nanoseconds=int(offset * 1e9))).to_msg()
        self.trajectory_pub.publish(trajectory_msg(trajectory, self.config.arm_joint_names,
                                                   stamp))

    def _reject_chunk(self, reason: str) -> None:
        """(lock held) A chunk failed vetting: brake, report, and keep asking for chunks."""
        self._last_error = f'chunk rejected: {reason}'
        self.get_logger().warning(self._last_error, throttle_duration_sec=2.0)
        self._brake()

    def _brake(self) -> None:
        """(lock held) Publish a stop from the current command (twist zero in ee_delta)."""
        self._twist = np.zeros(6)
        self.delta_plan.clear()
        if self.config is None:
            return
        if self.config.action_mode == 'ee_delta':
            self.twist_pub.publish(twist_msg(self._twist, self.get_clock().now().to_msg(),
                                             self.config.twist_frame))
            return
        if self.executor_.command is None:
            return
        trajectory = self.executor_.hold(self.now_s())
        self._publish_trajectory(trajectory)
        self.marker_pub.publish(path_markers(self.robot, trajectory.positions,
                                             self.get_clock().now().to_msg()))

    # ------------------------------------------------------------------------- inference
    def _run_inference(self, request: _Request) -> None:
        """Worker thread: observation -> model -> safety -> splice -> publish."""
        cfg = self.config
        if cfg is None:
            return
        try:
            obs = {'images': {name: image_to_rgb(msg) for name, msg in request.images.items()},
                   'state': robot_state(request.joint_state, cfg.arm_joint_names,
                                        cfg.finger_joint_names),
                   'instruction': request.instruction}
        except (KeyError, ValueError, RuntimeError) as exc:
            with self._lock:
                if request.generation == self._generation:
                    self._hold(f'bad observation: {exc}', cause='input')
            return
        start = time.perf_counter()
        try:
            out = self._policy.infer(obs)
            actions = np.asarray(out['actions'], dtype=np.float64)
            dt = float(out.get('dt', self._chunk_dt))
        except ConnectionError as exc:
            with self._lock:
                if self._active and self._state != ERROR:
                    if self._hold_cause != 'server':
                        self._hold(f'inference server unreachable: {exc}', cause='server')
                    self._retry_at = self.now_s() + getattr(exc, 'retry_in_s', 0.0)
            return
        except Exception as exc:  # noqa: BLE001 - any model failure holds the robot
            self.get_logger().error('inference failed:\n' + traceback.format_exc())
            with self._lock:
                if self._active:
                    self._hold(f'inference failed: {type(exc).__name__}: {exc}', cause='error',
                               state=ERROR)
            return
        latency_ms = (time.perf_counter() - start) * 1e3
        round_trip = (out.get('client_timing') or {}).get('round_trip_ms')
        with self._lock:
            if not self._active or request.generation != self._generation:
                if self._hold_cause == 'server' and self._active:   # server back: resume
                    self._set_state(RUNNING, '', '')
                return
            if self._hold_cause == 'server':
                self._set_state(RUNNING, '', '')
            self.inference_ms.append(latency_ms)
            if round_trip is not None:
                self.round_trip_ms.append(float(round_trip))
            self._chunk_dt = dt
            if cfg.action_mode == 'joint':
                self._splice_joint(request, actions, dt, latency_ms)
            else:
                self._splice_delta(request, actions, dt, latency_ms)

    def _splice_joint(self, request: _Request, actions: np.ndarray, dt: float,
                      latency_ms: float) -> None:
        """(lock held) Vet, splice and publish one joint-mode chunk."""
        cfg = self.config
        q_obs = joint_positions(request.joint_state, cfg.arm_joint_names)
        check = self.safety.check_chunk(actions, dt, q_obs)
        if not check.ok:
            self._reject_chunk(check.hold_reason)
            return
        values = np.hstack([check.positions, check.gripper[:, None]])
        now = self.now_s()
        trajectory, reason = self.executor_.splice(values, dt, request.t_obs, now)
        self._publish_trajectory(trajectory)
        stamp = self.get_clock().now()
        self._record_e2e(stamp, request.obs_stamp)
        self._chunks += 1
        self.chunk_pub.publish(action_chunk_msg(values, dt, cfg.arm_joint_names,
                                                _to_time(request.obs_stamp), self._model_id,
                                                latency_ms))
        self.marker_pub.publish(path_markers(self.robot, trajectory.positions, stamp.to_msg()))
        if reason:
            self.get_logger().warning(f'holding: {reason}', throttle_duration_sec=2.0)
            self._last_error = reason

    def _splice_delta(self, request: _Request, actions: np.ndarray, dt: float,
                      latency_ms: float) -> None:
        """(lock held) Vet and splice one ee_delta chunk; the control timer streams twists."""
        q_obs = joint_positions(request.joint_state, self.config.arm_joint_names)
        values, reason = self.safety.check_delta_chunk(actions, dt, self.robot.tcp_position(q_obs))
        if reason:
            self._reject_chunk(reason)
            return
        self.delta_plan.splice(values, dt, request.t_obs, self.now_s())
        self._record_e2e(self.get_clock().now(), request.obs_stamp)
        self._chunks += 1
        self.chunk_pub.publish(action_chunk_msg(values, dt, ['x', 'y', 'z', 'rx', 'ry', 'rz'],
                                                _to_time(request.obs_stamp), self._model_id,
                                                latency_ms))

    def _record_e2e(self, now: Any, obs_stamp: float) -> None:
        """Image stamp -> publish; skipped when the stamps are on another clock (sim time
        without use_sim_time)."""
        latency = now.nanoseconds * 1e-9 - obs_stamp
        if obs_stamp > 0.0 and 0.0 <= latency < 60.0:
            self.e2e_latency_ms.append(latency * 1e3)

    def shutdown(self) -> None:
        """Process exit: brake while the middleware is up (Ctrl-C shuts rclpy's context down
        first; the controller then holds the last trajectory's end on its own), stop the
        worker."""
        with self._lock:
            if self._active and self.config is not None and self.context.ok():
                try:
                    self._hold('shutting down', cause='user')
                except RuntimeError as exc:   # the context went down meanwhile
                    print(f'iflybot_policy: no brake trajectory at shutdown: {exc}',
                          file=sys.stderr)
            self._active = False
        if self._worker is not None:
            self._worker.stop(timeout=2.0)

    # ------------------------------------------------------------------------- monitoring
    def status(self) -> PolicyStatus:
        with self._lock:
            latencies = np.asarray(self.inference_ms, dtype=np.float64)
            ticks = np.asarray(self.tick_times, dtype=np.float64)[-250:]
            msg = PolicyStatus(state=self._state if self._active else IDLE,
                               missed_ticks=self._missed_ticks,
                               instruction=self._instruction, chunks_produced=self._chunks,
                               last_error=self._last_error)
        msg.header.stamp = self.get_clock().now().to_msg()
        if len(latencies):
            msg.inference_latency_p50_ms = float(np.percentile(latencies, 50))
            msg.inference_latency_p99_ms = float(np.percentile(latencies, 99))
        if len(ticks) > 1 and ticks[-1] > ticks[0]:
            msg.control_rate_hz = float((len(ticks) - 1) / (ticks[-1] - ticks[0]))
            period = 1.0 / self.config.control_rate_hz
            msg.control_jitter_p99_ms = jitter(ticks, period)['p99_ms']
        e2e = np.asarray(self.e2e_latency_ms, dtype=np.float64)
        if len(e2e):
            msg.e2e_latency_p50_ms = float(np.percentile(e2e, 50))
            msg.e2e_latency_p99_ms = float(np.percentile(e2e, 99))
        return msg

    def _publish_status(self) -> None:
        if self.config is not None:
            self.status_pub.publish(self.status())

    def _publish_diagnostics(self) -> None:
        if self.config is None:
            return
        status = self.status()
        level = {IDLE: DiagnosticStatus.OK, RUNNING: DiagnosticStatus.OK,
                 HOLD: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}[status.state]
        values = {'state': STATE_NAMES[status.state], 'model': self._model_id,
                  'backend': self.config.inference_backend,
                  'strategy': self.config.execution_strategy,
                  'chunks_produced': str(status.chunks_produced),
                  'inference_latency_p50_ms': f'{status.inference_latency_p50_ms:.1f}',
                  'inference_latency_p99_ms': f'{status.inference_latency_p99_ms:.1f}',
                  'control_rate_hz': f'{status.control_rate_hz:.1f}'}
        for name, window in (('e2e_latency', self.e2e_latency_ms),
                             ('round_trip', self.round_trip_ms)):
            if len(window):
                values[f'{name}_p50_ms'] = f'{np.percentile(list(window), 50):.1f}'
        diag = DiagnosticStatus(level=level, name='iflybot_policy', hardware_id='fr3',
                                message=status.last_error or STATE_NAMES[status.state],
                                values=[KeyValue(key=k, value=v) for k, v in values.items()])
        array = DiagnosticArray(status=[diag])
        array.header.stamp = status.header.stamp
        self.diag_pub.publish(array)

    # ------------------------------------------------------------------------- services
    def _on_estop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            was_active = self._active
            if self.config is not None and self._active:
                self._hold('e-stop', cause='user')
            self._goal_token += 1   # running goals end with reason 'estop'
        if was_active:
            self.trigger_deactivate()
        self.get_logger().warning('e-stop: holding and deactivated')
        response.success = True
        response.message = 'holding; node deactivated' if was_active else 'holding (inactive)'
        return response

    def _on_goal(self, goal: RunPolicy.Goal) -> GoalResponse:
        if not self._active:
            self.get_logger().warning('run_policy rejected: node is not active')
            return GoalResponse.REJECT
        if not goal.instruction.strip():
            self.get_logger().warning('run_policy rejected: empty instruction')
            return GoalResponse.REJECT
        if len(goal.instruction) > MAX_INSTRUCTION_CHARS:
            self.get_logger().warning(f'run_policy rejected: instruction of '
                                      f'{len(goal.instruction)} characters (limit '
                                      f'{MAX_INSTRUCTION_CHARS})')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    async def _execute_goal(self, goal_handle: Any) -> RunPolicy.Result:
        goal = goal_handle.request
        with self._lock:
            self._goal_token += 1
            token = self._goal_token
            self._inputs_after = goal.inputs_after.sec + goal.inputs_after.nanosec * 1e-9
            self._start_instruction(goal.instruction)
            if self._inputs_after > 0 and self._run_start is None:
                self._run_start = self.now_s()
            self._step(self.now_s(), outputs=False)   # a paused (lockstep) clock has no ticks
            chunks0 = self._chunks
            self._success_armed = False
            start = self.now_s()
        result = RunPolicy.Result()
        last_feedback = 0.0
        while True:
            now = self.now_s()
            elapsed = now - start
            with self._lock:
                state, error, active = self._state, self._last_error, self._active
                chunks = self._chunks - chunks0
                preempted = token != self._goal_token
            reason = ''
            if preempted:
                reason = 'estop' if not active else 'preempted'
            elif goal_handle.is_cancel_requested:
                with self._lock:
                    self._instruction = ''
                    self._hold('run_policy canceled', cause='user')
                goal_handle.canceled()
                result.reason = 'canceled'
                break
            elif self._success_since > start:
                result.success, reason = True, 'success'
            elif not active:
                reason = 'deactivated'
            elif state == ERROR:
                reason = f'error: {error}'
            elif goal.max_duration > 0 and elapsed >= goal.max_duration:
                reason = 'timeout'
            if reason:
                with self._lock:
                    if token == self._goal_token and self._active:
                        self._instruction = ''
                        self._hold(f'run_policy ended: {reason}', cause='user')
                result.reason = reason
                if result.success:
                    goal_handle.succeed()
                else:
                    goal_handle.abort()
                break
            if now - last_feedback >= 0.5:
                last_feedback = now
                goal_handle.publish_feedback(RunPolicy.Feedback(elapsed=elapsed, chunks=chunks,
                                                                state=state))
            await self._next_tick()
            if self._torn_down:    # the action server is gone: nobody to report to
                return result
        result.duration = self.now_s() - start
        return result


def _to_time(seconds: float) -> Any:
    from builtin_interfaces.msg import Time
    nanos = int(round(seconds * 1e9))
    return Time(sec=nanos // 1_000_000_000, nanosec=nanos % 1_000_000_000)


def main(argv: Sequence[str] | None = None) -> int:
    rclpy.init(args=list(sys.argv if argv is None else argv))
    node = None
    try:
        node = PolicyNode()
        # One thread: every callback is short and inference runs on the worker thread. Python's
        # MultiThreadedExecutor spent ~85% of a core rebuilding its wait set and handing work to
        # its pool, which starved the callbacks (docs/realtime.md).
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.shutdown()
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0

if __name__ == '__main__':
    sys.exit(main())
