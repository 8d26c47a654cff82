"""`PolicyRuntime`: what the policy node does, without ROS.

Inputs come in as plain data (joint positions, opaque image payloads with their stamps,
booleans, instructions), time from the injected clocks; commands go out through `Outputs`.
The control tick runs the watchdog, the run start, the tracking check, chunk requests, the
gripper and ee_delta twists; the inference worker runs the model on the newest observation,
vets the chunk (safety.py), splices it onto what executes (chunking.py) and publishes one
trajectory per chunk. Outputs are called with the runtime's lock held, so a hold published on
one thread is never overtaken by a chunk from the other.
"""
from __future__ import annotations

import math
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from iflybot_vla_policy.chunking import ChunkExecutor, ChunkPlan, ExecutionConfig
from iflybot_vla_policy.observation_sync import skew_limit
from iflybot_vla_policy.robot import RobotSpec
from iflybot_vla_policy.runtime.config import MAX_INSTRUCTION_CHARS, NodeConfig, safety_config
from iflybot_vla_policy.runtime.freshness import InputTracker, JointSample, SuccessLatch
from iflybot_vla_policy.runtime.loading import LoadedPolicy
from iflybot_vla_policy.runtime.requests import RequestScheduler
from iflybot_vla_policy.runtime.rtc_prefix import RTCPrefix
from iflybot_vla_policy.runtime.stats import RuntimeStats, StatusSnapshot
from iflybot_vla_policy.runtime.supervisor import HoldCause, Log, RunState, Supervisor
from iflybot_vla_policy.runtime.worker import InferenceWorker
from iflybot_vla_policy.safety import SafetyFilter, Trajectory

DELTA_NAMES = ('x', 'y', 'z', 'rx', 'ry', 'rz')
LOG_THROTTLE_S = 2.0


class Outputs(Protocol):
    """Where the runtime's commands go: the node's publishers, or a recorder in tests."""

    def trajectory(self, trajectory: Trajectory) -> None: ...   # joint mode (+ path markers)
    def twist(self, twist: np.ndarray) -> None: ...             # (6,) ee_delta mode
    def gripper(self, width: float, grasp: bool) -> None: ...   # on change

    def chunk(self, values: np.ndarray, dt: float, names: Sequence[str], obs_stamp: float,
              latency_ms: float) -> None: ...                   # values (horizon, dim + 1)


class Worker(Protocol):
    busy: bool

    def submit(self, request: Request) -> bool: ...
    def stop(self, timeout: float = ...) -> None: ...


@dataclass(frozen=True)
class Request:
    generation: int
    t_obs: float                # node time of the snapshot (the frames' if the clock lags)
    obs_stamp: float            # oldest image stamp (s, ROS clock), 0 if unknown
    images: dict[str, Any]      # camera name -> payload, decoded on the worker thread
    joint: JointSample
    instruction: str
    previous: np.ndarray | None = None   # rtc: (L, d) the executing plan from t_obs on
    inference_delay: int = 0             # rtc: actions of it that run before the new chunk


@dataclass(frozen=True)
class Goal:
    token: int
    start: float          # node time
    chunks0: int
    max_duration: float   # s, 0: none


@dataclass(frozen=True)
class GoalUpdate:
    """Where a goal stands: `reason` is '' while it runs ('canceled', 'success', 'timeout',
    'deactivated', 'estop', 'preempted', 'error: ...' when it ended)."""

    reason: str
    success: bool
    elapsed: float
    chunks: int
    state: RunState


class PolicyRuntime:
    """One configured policy run: see the module docstring. `clock` is the node's clock (sim
    time under use_sim_time, else monotonic); `stamp_clock` the one message stamps are on."""

    def __init__(self, cfg: NodeConfig, robot: RobotSpec, loaded: LoadedPolicy,
                 outputs: Outputs, clock: Callable[[], float],
                 stamp_clock: Callable[[], float] | None = None, log: Log | None = None,
                 decode_image: Callable[[Any], np.ndarray] = np.asarray,
                 stats: RuntimeStats | None = None,
                 worker: Callable[[Callable[[Request], None]], Worker] = InferenceWorker) -> None:
        self.config = cfg
        self.robot = robot
        self.policy = loaded.policy
        self.model_id = loaded.model_id
        self._chunk_dt = loaded.chunk_dt
        self._outputs = outputs
        self._clock = clock
        self._stamp_clock = stamp_clock or clock
        self._log = log or (lambda level, text: None)
        self._decode = decode_image
        self.stats = stats or RuntimeStats()
        self.safety = SafetyFilter(robot, safety_config(cfg))
        execution = ExecutionConfig(strategy=cfg.execution_strategy,
                                    commit_latency=cfg.commit_latency_s,
                                    ensemble_decay=cfg.ensemble_decay)
        self.executor = ChunkExecutor(self.safety, execution)
        self.delta_plan = ChunkPlan(execution)
        self.rtc = RTCPrefix(cfg.commit_latency_s) if cfg.execution_strategy == 'rtc' else None
        self._horizon: int | None = None
        self.supervisor = Supervisor(self._log)
        self.inputs = InputTracker(cfg.camera_names, cfg.joint_state_timeout_s,
                                   cfg.camera_timeout_s)
        self.success = SuccessLatch()
        self.scheduler = RequestScheduler(cfg.inference_rate_hz)
        # Reentrant: a caller holding it (a test arranging a state) may call the methods.
        self.lock = threading.RLock()
        self.instruction = cfg.instruction
        self.chunks_produced = 0
        self._goal_token = 0
        self._twist = np.zeros(6)
        self._gripper_sent: tuple[float, bool] | None = None
        self._logged: dict[str, float] = {}
        self.worker = worker(self.run_request)

    @property
    def q_measured(self) -> np.ndarray | None:
        """(n_joints,) the newest measured arm positions."""
        joint = self.inputs.joint
        return None if joint is None else joint.q

    @property
    def state(self) -> RunState:
        return self.supervisor.reported_state

    def _log_throttled(self, key: str, text: str, level: str = 'warning') -> None:
        now = time.monotonic()
        if now - self._logged.get(key, -math.inf) >= LOG_THROTTLE_S:
            self._logged[key] = now
            self._log(level, text)

    # ------------------------------------------------------------------------ lifecycle
    def activate(self) -> None:
        with self.lock:
            now = self._clock()
            q = self.q_measured
            if q is None:
                self._log('warning', 'activating without a joint state: holding until one '
                                     'arrives')
            self._reset_command(q, now)
            self.supervisor.activate(self.instruction)
            self.scheduler.reset()
            self.inputs.begin_run(now)

    def deactivate(self, reason: str = 'deactivated') -> None:
        with self.lock:
            self.supervisor.deactivate(reason)
            self._brake(self._clock())

    def shutdown(self, brake: bool = True, reason: str = 'shutting down') -> None:
        """Process exit: brake (while the middleware can still publish), stop the worker."""
        with self.lock:
            if self.supervisor.active and brake:
                try:
                    self.supervisor.hold(HoldCause.USER, reason)
                    self._brake(self._clock())
                except RuntimeError as exc:   # the middleware went down meanwhile
                    self._log('warning', f'no brake trajectory at shutdown: {exc}')
            self.supervisor.active = False
        self.worker.stop(timeout=2.0)

    def close(self) -> None:
        """Stop the worker and release the policy (its child process, its connection)."""
        self.worker.stop()
        close = getattr(self.policy, 'close', None)
        if callable(close):
            close()
        self.policy = None

    def estop(self) -> bool:
        """Hold, and end any running goal with 'estop'; returns whether the runtime was active
        (the node then deactivates)."""
        with self.lock:
            was_active = self.supervisor.active
            if was_active:
                self.supervisor.hold(HoldCause.USER, 'e-stop')
                self._brake(self._clock())
            self._goal_token += 1
        return was_active

    # ------------------------------------------------------------------------ inputs
    def on_image(self, name: str, payload: Any, stamp: float) -> None:
        """A camera frame (decoded only when a request uses it); stamp 0: unstamped."""
        with self.lock:
            now = self._clock()
            self.inputs.image(name, payload, stamp, now)
            if self.inputs.fresh_frames():
                # Plan on a frame as soon as it is complete instead of at the next tick: the
                # frame's age at the request is what the image-to-trajectory latency adds.
                self._step(now, outputs=False)

    def on_joint_state(self, q: np.ndarray, width: float, stamp: float) -> None:
        """Finite arm positions (n_joints,) and gripper width (m), with their header stamp."""
        with self.lock:
            now = self._clock()
            self.inputs.joint_state(JointSample(np.asarray(q, dtype=np.float64), float(width),
                                                stamp), now)
            if self.supervisor.active and self.inputs.fresh_frames():
                self._step(now, outputs=False)   # a frame set may be waiting for this state

    def on_refused_input(self, name: str, reason: str) -> None:
        """A message of `name` ('joint_states' or a camera) that could not be used."""
        with self.lock:
            self.inputs.refused(name, reason)

    def on_task_success(self, success: bool) -> None:
        with self.lock:
            self.success.observe(success, self._clock())

    def refusal(self, instruction: str) -> str:
        """Why an instruction (topic or goal) is refused; '' when it is acceptable."""
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            return (f'instruction of {len(instruction)} characters (limit '
                    f'{MAX_INSTRUCTION_CHARS})')
        return ''

    def goal_refusal(self, instruction: str) -> str:
        """Why a run_policy goal is rejected: a goal that lands before activation finished is
        refused (the caller retries) rather than accepted and lost."""
        if not self.supervisor.active:
            return 'node is not active'
        if not instruction.strip():
            return 'empty instruction'
        return self.refusal(instruction)

    def instruct(self, text: str) -> None:
        """Run with a new instruction (resumes from a user hold); '' holds."""
        with self.lock:
            self._start_instruction(text, self._clock())
            self._step(self._clock(), outputs=False)   # a paused (lockstep) clock has no ticks

    def _start_instruction(self, text: str, now: float) -> None:
        self.instruction = text
        restarted = self.supervisor.instruct(text)
        if not self.supervisor.active:
            return
        if not text:
            self._brake(now)
            return
        if restarted:
            self._start_from_measured(now)
            self.inputs.begin_run(now)
        self.scheduler.reset()

    def _start_from_measured(self, now: float) -> None:
        """A run starts from where the arm is when the held command stands still (a sim reset
        or a person may have moved the arm within the tracking tolerance: planning from the old
        command made the first trajectory jump there; a hold counts from its start, since a
        stopped lockstep clock never passes its end) or when the arm is far from it (instead
        of failing the tracking check on the first tick)."""
        q = self.q_measured
        if self.config.action_mode != 'joint' or q is None or self.executor.command is None:
            return
        q_cmd, _ = self.executor.commanded(now)
        if self.executor.command.at_rest_from(now) or \
                self.safety.tracking_error_reason(q_cmd, q):
            self.executor.reset(q, now)

    # ------------------------------------------------------------------------ goals
    def start_goal(self, instruction: str, inputs_after: float, max_duration: float) -> Goal:
        """A run_policy goal: run `instruction` from inputs stamped at or after `inputs_after`
        (s, 0: arrived after the goal began)."""
        with self.lock:
            self._goal_token += 1
            self.inputs.inputs_after = inputs_after
            self._start_instruction(instruction, self._clock())
            if inputs_after > 0 and not self.inputs.run_pending:
                self.inputs.begin_run(self._clock())
            self._step(self._clock(), outputs=False)   # a paused (lockstep) clock has no ticks
            self.success.disarm()
            return Goal(self._goal_token, self._clock(), self.chunks_produced, max_duration)

    def goal_update(self, goal: Goal, cancel_requested: bool) -> GoalUpdate:
        """Checked once per control tick while the goal runs; an ended goal holds the robot."""
        now = self._clock()
        elapsed = now - goal.start
        with self.lock:
            sup = self.supervisor
            state, error, active = sup.state, sup.last_error, sup.active
            chunks = self.chunks_produced - goal.chunks0
            preempted = goal.token != self._goal_token
        success = False
        if preempted:
            reason = 'estop' if not active else 'preempted'
        elif cancel_requested:
            reason = 'canceled'
        elif self.success.since > goal.start:
            success, reason = True, 'success'
        elif not active:
            reason = 'deactivated'
        elif state == RunState.ERROR:
            reason = f'error: {error}'
        elif goal.max_duration > 0 and elapsed >= goal.max_duration:
            reason = 'timeout'
        else:
            reason = ''
        if reason and not preempted:
            with self.lock:   # unless an e-stop or a newer goal took over meanwhile
                current = goal.token == self._goal_token and self.supervisor.active
                if reason == 'canceled' or current:
                    self.instruction = ''
                    self.supervisor.hold(HoldCause.USER, 'run_policy canceled'
                                         if reason == 'canceled' else
                                         f'run_policy ended: {reason}')
                    self._brake(self._clock())
        return GoalUpdate(reason, success, elapsed, chunks, state)

    # ------------------------------------------------------------------------ control
    def tick(self) -> None:
        """The control timer."""
        now = self._clock()
        self.stats.tick(now, self.supervisor.active, 1.0 / self.config.control_rate_hz)
        if not self.lock.acquire(blocking=False):
            return   # the worker is splicing; the controller keeps executing the trajectory
        try:
            self._step(now, outputs=True)
        finally:
            self.lock.release()

    def _step(self, now: float, outputs: bool) -> None:
        """Watchdog, run start, tracking check and chunk requests; with `outputs` (the control
        tick) also the gripper and ee_delta twists."""
        sup, cfg = self.supervisor, self.config
        if not sup.active:
            return
        q = self.q_measured
        if q is not None and self.executor.command is None:
            self._reset_command(q, now)
        stale = self.inputs.stale_reason(now)
        if stale:
            if sup.inputs_stale(stale):
                self._brake(now)
            if outputs and cfg.action_mode == 'ee_delta':   # explicit zeros
                self._command_gripper_and_twist(now)
            return
        sup.inputs_fresh()
        if self.inputs.run_pending and sup.state == RunState.RUNNING:
            # A run's first check and first chunk use inputs from after it began: the joint
            # state of a sim reset may still be in flight when the goal lands.
            if not self.inputs.run_inputs_ready():
                if self.inputs.inputs_after > 0:
                    self._log_throttled('inputs_after', f'run_policy: waiting for inputs '
                                        f'stamped after {self.inputs.inputs_after:.3f} s', 'info')
                return
            self._start_from_measured(now)
        command = self.executor.command
        if cfg.action_mode == 'joint' and command is not None:
            if sup.state != RunState.RUNNING and now > command.end:
                # At rest and not running: the measurement is the truth (a sim reset or a
                # person may have moved the arm); the next run starts from it.
                self.executor.reset(q, now)
            q_cmd, _ = self.executor.commanded(now)
            reason = self.safety.tracking_error_reason(q_cmd, q)
            if reason and sup.state == RunState.RUNNING:
                sup.hold(HoldCause.ERROR, reason)
                self._brake(now)
                return
        frame_time = self.inputs.frame_time()
        if sup.wants_chunks and not self.worker.busy and self.inputs.fresh_frames() and \
                self.inputs.state_caught_up(now) and self.scheduler.due(now, frame_time):
            self._submit(now, frame_time)
        if outputs:
            self._command_gripper_and_twist(now)

    def _submit(self, now: float, frame_time: float) -> None:
        """Hand the newest time-aligned observation to the worker (with rtc, the plan it
        continues); one whose inputs are too far apart is refused with a hold naming them."""
        images, joint, alignment = self.inputs.observation()
        self.stats.skew(alignment.skew)
        limit = skew_limit(self.inputs.camera_period(), self.config.max_observation_skew_s)
        if alignment.skew > limit:
            self.scheduler.submitted(frame_time)
            self.inputs.mark_used()
            why = self.inputs.refused_reason(alignment.worst)   # e.g. a renamed joint
            if self.supervisor.bad_observation(alignment.describe(limit, why)):
                self._brake(now)
            return
        t_obs = self.inputs.obs_time(now)
        previous, delay = None, 0
        if self.rtc is not None:
            plan = self.executor.plan if self.config.action_mode == 'joint' else self.delta_plan
            previous, delay = self.rtc.request(plan, t_obs, self._chunk_dt, self._horizon)
        request = Request(self.supervisor.generation, t_obs, self.inputs.obs_stamp(), images,
                          joint, self.instruction, previous, delay)
        if self.worker.submit(request):
            self.scheduler.submitted(frame_time)
            self.inputs.mark_used()

    def _command_gripper_and_twist(self, now: float) -> None:
        """Gripper on change; ee_delta twist at control rate."""
        cfg, running = self.config, self.supervisor.state == RunState.RUNNING
        if cfg.action_mode == 'joint':
            width = self.executor.gripper_at(now) if running else None
        else:
            values = self.delta_plan.at(now) if running else None
            twist = np.zeros(6)
            if values is not None and now <= self.delta_plan.end:
                twist = values[:6] / self._chunk_dt
            self._twist = self.safety.limit_twist(self._twist, twist, 1.0 / cfg.control_rate_hz)
            self._outputs.twist(self._twist)
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
            self._outputs.gripper(width, grasp)

    # ------------------------------------------------------------------------ holding
    def _reset_command(self, q: np.ndarray | None, now: float) -> None:
        self.executor.plan.clear()
        self.delta_plan.clear()
        if q is not None:
            self.executor.reset(q, now)

    def _brake(self, now: float) -> None:
        """Publish a stop from the current command (a zero twist in ee_delta mode)."""
        self._twist = np.zeros(6)
        self.delta_plan.clear()
        if self.config.action_mode == 'ee_delta':
            self._outputs.twist(self._twist)
        elif self.executor.command is not None:
            self._outputs.trajectory(self.executor.hold(now))

    def _reject_chunk(self, reason: str) -> None:
        """A chunk failed vetting: brake, report, and keep asking for chunks."""
        self.supervisor.note(f'chunk rejected: {reason}')
        self._log_throttled('rejected', self.supervisor.last_error)
        self._brake(self._clock())

    # ------------------------------------------------------------------------ inference
    def run_request(self, request: Request) -> None:
        """The worker: observation -> model -> safety -> splice -> publish."""
        sup = self.supervisor
        try:
            obs = {'images': {n: self._decode(p) for n, p in request.images.items()},
                   'state': request.joint.state(), 'instruction': request.instruction}
        except (KeyError, ValueError, RuntimeError) as exc:
            with self.lock:
                if request.generation == sup.generation and \
                        sup.bad_observation(f'bad observation: {exc}'):
                    self._brake(self._clock())
            return
        with self.lock:
            sup.observation_decoded()
        kwargs = {} if request.previous is None else {
            'previous': request.previous, 'inference_delay': request.inference_delay}
        start = time.perf_counter()
        try:
            out = self.policy.infer(obs, **kwargs)
            actions = np.asarray(out['actions'], dtype=np.float64)
            dt = float(out.get('dt', self._chunk_dt))
        except ConnectionError as exc:
            with self.lock:
                if sup.active and sup.state != RunState.ERROR:
                    if sup.server_unreachable(f'inference server unreachable: {exc}'):
                        self._brake(self._clock())
                    self.scheduler.back_off(self._clock() + getattr(exc, 'retry_in_s', 0.0))
            return
        except Exception as exc:  # noqa: BLE001 - any model failure holds the robot
            self._log('error', 'inference failed:\n' + traceback.format_exc())
            with self.lock:
                if sup.active:
                    sup.hold(HoldCause.ERROR, f'inference failed: {type(exc).__name__}: {exc}')
                    self._brake(self._clock())
            return
        latency_ms = (time.perf_counter() - start) * 1e3
        round_trip = (out.get('client_timing') or {}).get('round_trip_ms')
        with self.lock:
            sup.server_answered()
            if not sup.active or request.generation != sup.generation:
                return   # held or restarted meanwhile: the chunk is of the past
            self.stats.inference(latency_ms, round_trip)
            self._chunk_dt, self._horizon = dt, len(actions)
            if self.config.action_mode == 'joint':
                self._splice_joint(request, actions, dt, latency_ms)
            else:
                self._splice_delta(request, actions, dt, latency_ms)

    def _splice_joint(self, request: Request, actions: np.ndarray, dt: float,
                      latency_ms: float) -> None:
        """Vet, splice and publish one joint-mode chunk."""
        check = self.safety.check_chunk(actions, dt, request.joint.q)
        if not check.ok:
            self._reject_chunk(check.hold_reason)
            return
        values = np.hstack([check.positions, check.gripper[:, None]])
        now = max(self._clock(), request.t_obs)   # never before the observation it answers
        trajectory, reason = self.executor.splice(values, dt, request.t_obs, now)
        if self.rtc is not None:
            self.rtc.spliced(request.t_obs, now)
        self._publish_chunk(request, values, dt, latency_ms, trajectory=trajectory)
        if reason:
            self._log_throttled('holding', f'holding: {reason}')
            self.supervisor.note(reason)

    def _splice_delta(self, request: Request, actions: np.ndarray, dt: float,
                      latency_ms: float) -> None:
        """Vet and splice one ee_delta chunk; the control tick streams the twists."""
        values, reason = self.safety.check_delta_chunk(actions, dt,
                                                       self.robot.tcp_position(request.joint.q))
        if reason:
            self._reject_chunk(reason)
            return
        now = max(self._clock(), request.t_obs)
        self.delta_plan.splice(values, dt, request.t_obs, now)
        if self.rtc is not None:
            self.rtc.spliced(request.t_obs, now)
        self._publish_chunk(request, values, dt, latency_ms)

    def _publish_chunk(self, request: Request, values: np.ndarray, dt: float,
                       latency_ms: float, trajectory: Trajectory | None = None) -> None:
        if trajectory is not None:
            self._outputs.trajectory(trajectory)
            names = self.config.arm_joint_names
        else:
            names = DELTA_NAMES
        self.stats.e2e(self._stamp_clock(), request.obs_stamp)
        self.chunks_produced += 1
        self._outputs.chunk(values, dt, names, request.obs_stamp, latency_ms)

    # ------------------------------------------------------------------------ monitoring
    def status(self) -> StatusSnapshot:
        with self.lock:
            sup = self.supervisor
            return self.stats.snapshot(1.0 / self.config.control_rate_hz,
                                       state=int(sup.reported_state),
                                       instruction=self.instruction,
                                       chunks_produced=self.chunks_produced,
                                       last_error=sup.last_error)

    def diagnostics(self, status: StatusSnapshot) -> dict[str, str]:
        """Key values for /diagnostics."""
        return {'state': RunState(status.state).name, 'model': self.model_id,
                'backend': self.config.inference_backend,
                'strategy': self.config.execution_strategy,
                'chunks_produced': str(status.chunks_produced),
                'inference_latency_p50_ms': f'{status.inference_latency_p50_ms:.1f}',
                'inference_latency_p99_ms': f'{status.inference_latency_p99_ms:.1f}',
                'control_rate_hz': f'{status.control_rate_hz:.1f}',
                **self.stats.diagnostic_values()}
