"""The policy runtime without ROS: a fake clock, a worker the test runs by hand, and outputs
recorded as plain data, so every hold cause and every race fixed through DDS so far replays
deterministically here (test_policy_node.py checks the same node over DDS)."""
from __future__ import annotations

import numpy as np
import pytest

from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.runtime import HoldCause, PolicyRuntime, Request, RunState, parse_config
from iflybot_vla_policy.runtime.loading import LoadedPolicy, load_policy
from iflybot_vla_policy.runtime.requests import RequestScheduler
from iflybot_vla_policy.runtime.supervisor import Supervisor

ROBOT = load_robot()
CAMERAS = ('scene_camera', 'wrist_camera')
IMAGE = np.zeros((4, 4, 3), dtype=np.uint8)


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Recorder:
    """`Outputs` as lists."""

    def __init__(self) -> None:
        self.trajectories: list = []
        self.twists: list[np.ndarray] = []
        self.grippers: list[tuple[float, bool]] = []
        self.chunks: list[dict] = []

    def trajectory(self, trajectory) -> None:
        self.trajectories.append(trajectory)

    def twist(self, twist: np.ndarray) -> None:
        self.twists.append(np.array(twist))

    def gripper(self, width: float, grasp: bool) -> None:
        self.grippers.append((width, grasp))

    def chunk(self, values, dt, names, obs_stamp, latency_ms) -> None:
        self.chunks.append({'values': values, 'names': list(names), 'obs_stamp': obs_stamp})


class ManualWorker:
    """Takes one request; the test decides when (on the fake clock) inference finishes."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.pending: Request | None = None
        self.submitted: list[Request] = []

    @property
    def busy(self) -> bool:
        return self.pending is not None

    def submit(self, request: Request) -> bool:
        if self.pending is not None:
            return False
        self.pending = request
        self.submitted.append(request)
        return True

    def finish(self) -> Request:
        request, self.pending = self.pending, None
        assert request is not None, 'no request was made'
        self.handle(request)
        return request

    def stop(self, timeout: float = 0.0) -> None:
        pass


class Creep:
    """Joint 1 creeps 0.01 rad per action from the observed state; `error` is raised instead
    when set."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.observations: list[dict] = []

    def infer(self, obs: dict) -> dict:
        self.observations.append(obs)
        if self.error is not None:
            raise self.error
        state = np.asarray(obs['state'], dtype=np.float64)
        actions = np.tile(state, (10, 1))
        actions[:, 0] += 0.01 * np.arange(1, 11)
        return {'actions': actions, 'dt': 0.1}


class Rig:
    def __init__(self, decode=np.asarray, **params: object) -> None:
        self.clock = Clock()
        self.out = Recorder()
        self.policy = Creep()
        cfg = parse_config({'inference_rate_hz': 5.0, **params}, ROBOT)
        self.rt = PolicyRuntime(cfg, ROBOT, LoadedPolicy(self.policy, 'creep', 0.1), self.out,
                                clock=self.clock, decode_image=decode, worker=ManualWorker)
        self.worker: ManualWorker = self.rt.worker
        self.q = ROBOT.home.copy()

    def joints(self, q: np.ndarray | None = None, stamp: float | None = None) -> None:
        self.rt.on_joint_state(self.q if q is None else q, 0.04,
                               self.clock.t if stamp is None else stamp)

    def frames(self, stamp: float | None = None) -> None:
        for c in CAMERAS:
            self.rt.on_image(c, IMAGE, self.clock.t if stamp is None else stamp)

    def advance(self, dt: float, inputs: bool = True, frames: bool = True) -> None:
        """dt of control ticks at 50 Hz; joint states every tick, frames every 0.2 s."""
        for _ in range(round(dt / 0.02)):
            self.clock.t += 0.02
            if inputs:
                self.joints()
                if frames and round(self.clock.t / 0.02) % 10 == 0:
                    self.frames()
            self.rt.tick()

    def start(self, instruction: str = 'pick') -> None:
        """Configured with inputs flowing, activated, running `instruction`."""
        self.joints()
        self.frames()
        self.rt.activate()
        if instruction:
            self.rt.instruct(instruction)
        self.advance(0.04, frames=False)
        self.frames()   # a run plans from inputs that arrived after it began: frames too

    @property
    def cause(self) -> HoldCause:
        return self.rt.supervisor.cause


def at_rest(trajectory) -> bool:
    return bool(np.all(trajectory.velocities[-1] == 0.0))


# ------------------------------------------------------------------------- supervisor
def test_supervisor_transitions_name_their_cause_and_only_the_cause_resumes():
    sup = Supervisor(lambda level, text: None)
    sup.activate('')
    assert (sup.state, sup.cause) == (RunState.HOLD, HoldCause.USER)
    sup.inputs_fresh()
    assert sup.state == RunState.HOLD, 'fresh inputs do not end a user hold'
    assert sup.instruct('pick') and sup.state == RunState.RUNNING
    generation = sup.generation
    assert sup.inputs_stale('stale input: joint_states: 0.30 s old')
    assert (sup.state, sup.cause) == (RunState.HOLD, HoldCause.INPUT)
    assert sup.generation > generation, 'a hold drops the chunks in flight'
    sup.inputs_fresh()
    assert sup.state == RunState.RUNNING
    assert sup.server_unreachable('inference server unreachable')
    assert not sup.server_unreachable('again'), 'one server hold, one brake'
    assert not sup.inputs_stale('stale'), 'stale inputs keep a server hold a server hold'
    sup.inputs_fresh()
    assert sup.cause == HoldCause.SERVER
    sup.server_answered()
    assert sup.state == RunState.RUNNING
    sup.hold(HoldCause.ERROR, 'fr3_joint2 is 0.5 rad from its command')
    assert (sup.state, sup.reported_state) == (RunState.ERROR, RunState.ERROR)
    sup.inputs_fresh()
    sup.server_answered()
    assert sup.state == RunState.ERROR, 'only a new instruction ends an error'
    sup.deactivate('deactivated')
    assert sup.reported_state == RunState.IDLE and not sup.active


def test_run_states_are_the_policy_status_constants():
    assert [s.value for s in RunState] == [0, 1, 2, 3]   # STATE_IDLE, RUNNING, HOLD, ERROR


def test_requests_follow_frame_times_with_slack_and_respect_the_server_backoff():
    s = RequestScheduler(5.0)
    assert s.due(now=0.0, frame_time=0.0)
    s.submitted(0.0)
    assert not s.due(now=0.25, frame_time=0.1)
    assert s.due(now=0.25, frame_time=0.19), 'a frame 10 ms early still counts'
    s.submitted(0.19)
    s.back_off(until=1.0)
    assert not s.due(now=0.9, frame_time=0.6)
    assert s.due(now=1.0, frame_time=0.6)


# ------------------------------------------------------------------------- running
def test_a_chunk_is_requested_when_every_camera_has_the_next_periods_frame():
    rig = Rig()
    rig.start()
    request = rig.worker.pending
    assert request is not None and request.instruction == 'pick'
    np.testing.assert_allclose(request.joint.q, ROBOT.home)
    t0 = rig.clock.t
    rig.clock.t += 0.05
    rig.worker.finish()
    assert rig.rt.chunks_produced == 1 and len(rig.out.chunks) == 1
    traj = rig.out.trajectories[-1]
    assert traj.start == pytest.approx(rig.clock.t) and at_rest(traj)
    assert rig.policy.observations[0]['state'].dtype == np.float32
    rig.clock.t = t0 + 0.1
    rig.frames()                       # a new frame set, but of the same 5 Hz period
    assert rig.worker.pending is None
    rig.clock.t = t0 + 0.2
    rig.joints()                       # the state of the frame's instant
    rig.rt.on_image(CAMERAS[0], IMAGE, rig.clock.t)
    assert rig.worker.pending is None, 'one camera of the next period is not enough'
    rig.rt.on_image(CAMERAS[1], IMAGE, rig.clock.t)
    assert rig.worker.pending is not None, 'requested on the frame, not at the next tick'


def test_no_second_request_while_the_worker_is_busy():
    rig = Rig()
    rig.start()
    rig.advance(1.0)
    assert len(rig.worker.submitted) == 1


# ------------------------------------------------------------------------- hold causes
def test_activation_without_an_instruction_holds_for_the_user_until_one_arrives():
    rig = Rig()
    rig.start(instruction='')
    assert (rig.rt.state, rig.cause) == (RunState.HOLD, HoldCause.USER)
    assert rig.rt.status().last_error == 'waiting for an instruction'
    rig.advance(0.5)
    assert rig.worker.pending is None
    rig.rt.instruct('pick')
    rig.advance(0.2)
    assert rig.worker.pending is not None
    rig.worker.finish()
    assert rig.rt.state == RunState.RUNNING


def test_an_empty_instruction_holds_for_the_user_and_brakes():
    rig = Rig()
    rig.start()
    rig.worker.finish()
    n = len(rig.out.trajectories)
    rig.rt.instruct('')
    assert (rig.rt.state, rig.cause) == (RunState.HOLD, HoldCause.USER)
    assert len(rig.out.trajectories) == n + 1 and at_rest(rig.out.trajectories[-1])


def test_stale_joint_states_hold_for_input_brake_and_fresh_ones_resume():
    rig = Rig(joint_state_timeout_s=0.25)
    rig.start()
    rig.worker.finish()
    n = len(rig.out.trajectories)
    rig.clock.t += 0.3
    rig.frames()
    rig.rt.tick()
    assert (rig.rt.state, rig.cause) == (RunState.HOLD, HoldCause.INPUT)
    assert 'joint_states' in rig.rt.status().last_error
    assert len(rig.out.trajectories) == n + 1 and at_rest(rig.out.trajectories[-1])
    rig.advance(0.3, inputs=False)
    assert len(rig.out.trajectories) == n + 1, 'nothing else is sent while input is stale'
    rig.advance(0.04)
    # Fresh again, but the frames waiting are of the time the joint states stopped: that
    # observation is refused as out of sync, and the next frame set resumes the run.
    assert (rig.rt.state, rig.cause) == (RunState.HOLD, HoldCause.OBSERVATION)
    assert 'observation out of sync: joint_states' in rig.rt.status().last_error
    assert rig.worker.pending is None
    rig.advance(0.2)
    assert rig.worker.pending is not None
    rig.worker.finish()
    assert rig.rt.state == RunState.RUNNING


def test_a_stale_camera_holds_for_input_naming_the_camera():
    rig = Rig(camera_timeout_s=0.5)
    rig.start()
    rig.advance(0.6, frames=False)
    assert (rig.rt.state, rig.cause) == (RunState.HOLD, HoldCause.INPUT)
    assert 'scene_camera' in rig.rt.status().last_error


def test_undecodable_frames_hold_while_they_last_and_a_frame_that_decodes_resumes():
    bad = {'on': True}

    def decode(payload):
        if bad['on']:
            raise ValueError("unsupported image encoding 'yuv422'")
        return payload

    rig = Rig(decode=decode)
    rig.start()
    rig.worker.finish()
    assert (rig.rt.state, rig.cause) == (RunState.HOLD, HoldCause.OBSERVATION)
    assert 'yuv422' in rig.rt.status().last_error and rig.rt.chunks_produced == 0
    brakes = len(rig.out.trajectories)
    for _ in range(3):                        # fresh but still undecodable frames
        rig.advance(0.4)
        rig.worker.finish()
        assert rig.rt.state == RunState.HOLD, 'fresh frames do not end the hold'
    assert len(rig.out.trajectories) == brakes, 'one brake, not one per request'
    bad['on'] = False
    rig.advance(0.4)
    rig.worker.finish()
    assert rig.rt.state == RunState.RUNNING and rig.rt.chunks_produced == 1


def test_a_refused_joint_state_is_named_in_the_hold_it_causes():
    rig = Rig(joint_state_timeout_s=0.25)
    rig.start()
    rig.rt.on_refused_input('joint_states', "joint state lacks joint(s) ['fr3_joint3']")
    rig.advance(0.3, inputs=False)
    assert (rig.rt.state, rig.cause) == (RunState.HOLD, HoldCause.INPUT)
    assert 'stale input: joint_states' in rig.rt.status().last_error
    assert "['fr3_joint3']" in rig.rt.status().last_error
    rig.advance(0.04)                         # a good one clears it
    assert rig.rt.state == RunState.RUNNING
    rig.advance(0.3, inputs=False)
    assert 'fr3_joint3' not in rig.rt.status().last_error


def test_an_unreachable_server_holds_keeps_asking_after_its_backoff_and_resumes():
    rig = Rig()
    rig.start()
    error = ConnectionError('refused')
    error.retry_in_s = 1.0
    rig.policy.error = error
    rig.worker.finish()
    assert (rig.rt.state, rig.cause) == (RunState.HOLD, HoldCause.SERVER)
    assert at_rest(rig.out.trajectories[-1])
    rig.advance(0.9)
    assert rig.worker.pending is None, 'not before the backoff'
    rig.advance(0.3)
    assert rig.worker.pending is not None, 'requests go on during a server hold'
    rig.worker.finish()                       # still down: one hold, no second brake
    assert rig.cause == HoldCause.SERVER
    rig.advance(0.6, inputs=False)            # stale inputs keep it a server hold
    rig.advance(0.04)
    assert rig.cause == HoldCause.SERVER and rig.rt.state == RunState.HOLD
    rig.policy.error = None
    rig.advance(1.2)
    rig.worker.finish()
    assert rig.rt.state == RunState.RUNNING


def test_a_tracking_error_while_running_is_an_error_and_ends_the_goal():
    rig = Rig(max_tracking_error=0.3)
    rig.start(instruction='')
    goal = rig.rt.start_goal('pick', 0.0, 60.0)
    rig.advance(0.04)
    rig.frames()
    pushed = ROBOT.home.copy()
    pushed[3] += 0.5                          # someone pushed the arm
    rig.q = pushed
    rig.advance(0.02)
    assert (rig.rt.state, rig.cause) == (RunState.ERROR, HoldCause.ERROR)
    update = rig.rt.goal_update(goal, cancel_requested=False)
    assert update.reason.startswith('error: ') and 'fr3_joint4' in update.reason


def test_a_model_failure_is_an_error():
    rig = Rig()
    rig.start()
    rig.policy.error = RuntimeError('CUDA out of memory')
    rig.worker.finish()
    assert (rig.rt.state, rig.cause) == (RunState.ERROR, HoldCause.ERROR)
    assert 'CUDA out of memory' in rig.rt.status().last_error


def test_a_rejected_chunk_brakes_without_leaving_running():
    rig = Rig()
    rig.start()
    rig.policy.infer = lambda obs: {'actions': np.full((10, 8), np.nan), 'dt': 0.1}
    rig.worker.finish()
    assert rig.rt.state == RunState.RUNNING and 'chunk rejected' in rig.rt.status().last_error
    assert rig.out.chunks == [] and at_rest(rig.out.trajectories[-1])


@pytest.mark.parametrize('end', ['cancel', 'timeout', 'estop', 'deactivate'])
def test_a_goal_that_ends_holds_for_the_user(end):
    rig = Rig()
    rig.start(instruction='')
    goal = rig.rt.start_goal('pick', 0.0, 1.0)
    rig.advance(0.2)
    rig.worker.finish()
    expected = {'cancel': 'canceled', 'timeout': 'timeout', 'estop': 'estop',
                'deactivate': 'deactivated'}[end]
    if end == 'estop':
        assert rig.rt.estop()
        rig.rt.deactivate()
    elif end == 'deactivate':
        rig.rt.deactivate()
    elif end == 'timeout':
        rig.advance(1.0)
    update = rig.rt.goal_update(goal, cancel_requested=end == 'cancel')
    assert update.reason == expected and not update.success
    assert rig.cause == HoldCause.USER and at_rest(rig.out.trajectories[-1])
    assert rig.rt.status().instruction == '' or end in ('estop', 'deactivate')
    chunks, requests = rig.rt.chunks_produced, len(rig.worker.submitted)
    if rig.worker.pending is not None:
        rig.worker.finish()           # in flight when the goal ended: dropped
    rig.advance(0.6)
    assert rig.rt.chunks_produced == chunks and len(rig.worker.submitted) == requests


# ------------------------------------------------------------------------- races
def test_a_success_left_over_from_the_last_episode_does_not_end_the_next_goal():
    rig = Rig()
    rig.start(instruction='')
    goal = rig.rt.start_goal('pick', 0.0, 60.0)
    rig.advance(0.1)
    rig.rt.on_task_success(True)              # the episode before the reset, still queued
    rig.advance(0.1)
    assert rig.rt.goal_update(goal, False).reason == ''
    rig.rt.on_task_success(False)             # this episode's
    rig.advance(0.1)
    rig.rt.on_task_success(True)
    update = rig.rt.goal_update(goal, False)
    assert (update.reason, update.success) == ('success', True)
    assert rig.cause == HoldCause.USER


def test_a_run_plans_only_from_inputs_stamped_at_or_after_inputs_after():
    rig = Rig(max_tracking_error=0.3)
    rig.start(instruction='')
    old = ROBOT.home.copy()
    old[1] += 0.2                             # the pose before the simulator's reset
    reset_stamp = rig.clock.t + 0.5
    rig.rt.start_goal('pick', reset_stamp, 60.0)
    for _ in range(10):                       # joint states and frames from before the reset
        rig.clock.t += 0.02
        rig.joints(old, stamp=reset_stamp - 1.0)
        rig.frames(stamp=reset_stamp - 1.0)
        rig.rt.tick()
    assert rig.worker.pending is None and rig.rt.chunks_produced == 0
    assert rig.rt.state == RunState.RUNNING, 'waiting, not an error'
    rig.clock.t = reset_stamp + 0.1
    rig.joints(ROBOT.home, stamp=reset_stamp)  # the reset's pose arrives
    rig.frames(stamp=reset_stamp)
    rig.worker.finish()
    np.testing.assert_allclose(rig.worker.submitted[0].joint.q, ROBOT.home)
    assert np.abs(rig.out.trajectories[-1].positions[0] - ROBOT.home).max() < 1e-9


def test_a_goal_arriving_before_activation_is_refused_and_one_right_after_runs():
    rig = Rig()
    rig.joints()
    rig.frames()
    assert rig.rt.goal_refusal('pick') == 'node is not active'
    rig.rt.activate()
    assert rig.rt.goal_refusal('pick') == ''
    assert rig.rt.goal_refusal('  ') == 'empty instruction'
    assert 'limit 2000' in rig.rt.goal_refusal('x' * 2001)
    rig.rt.start_goal('pick', 0.0, 60.0)
    rig.advance(0.2)
    assert rig.worker.pending is not None
    rig.worker.finish()
    assert rig.rt.state == RunState.RUNNING


def test_a_run_that_starts_before_the_reset_pose_arrives_waits_for_it_instead_of_erroring():
    rig = Rig(max_tracking_error=0.3)
    rig.start(instruction='')
    with rig.rt.lock:                         # the held command at the old pose, still in force
        rig.rt.executor.reset(ROBOT.home, rig.clock.t + 60.0)
        rig.rt.instruct('pick')
    moved = ROBOT.home.copy()
    moved[1] += 0.8
    rig.advance(0.1, inputs=False)            # ticks before the reset's joint state arrives
    assert rig.worker.pending is None and rig.rt.state == RunState.RUNNING
    rig.q = moved
    rig.advance(0.2)
    assert rig.rt.state == RunState.RUNNING, rig.rt.status().last_error
    rig.worker.finish()
    np.testing.assert_allclose(rig.out.trajectories[-1].positions[0], moved, atol=1e-9)


def test_a_run_after_a_lockstep_reset_starts_from_the_measured_pose_on_a_stopped_clock():
    # The simulator's clock stands still at the reset: the held command ends exactly 'now',
    # and the first chunk was planned from the pose before the reset.
    rig = Rig(max_tracking_error=0.3)
    rig.start(instruction='')
    with rig.rt.lock:
        rig.rt.executor.reset(ROBOT.home, rig.clock.t)
    rig.clock.t = rig.rt.executor.command.end          # the hold has just ended: clock stops
    nudged = ROBOT.home.copy()
    nudged[0] += 0.1                          # within the tracking tolerance
    rig.joints(nudged, stamp=rig.clock.t)
    rig.frames(stamp=rig.clock.t)
    rig.rt.start_goal('pick', rig.clock.t, 60.0)
    rig.worker.finish()                       # the clock has not moved
    np.testing.assert_allclose(rig.out.trajectories[-1].positions[0], nudged, atol=1e-9)


def test_a_lockstep_run_starts_from_the_measured_pose_before_its_hold_ends():
    # The goal lands at the reset instant: its instruction resets the command to a hold at the
    # pose before the reset, and the clock never passes that hold's end. 'Ended' alone made
    # the first chunk start there, pulling the arm back ~0.2 rad after every reset.
    rig = Rig(max_tracking_error=0.3)
    rig.start(instruction='')
    old = ROBOT.home.copy()
    old[0] += 0.2                             # the last episode's final pose, at rest
    rig.q = old
    rig.advance(0.3, frames=False)
    reset = rig.clock.t                       # the simulator resets and stops its clock
    rig.rt.start_goal('pick', reset, 60.0)    # planned from `old` until the reset pose arrives
    assert rig.rt.executor.command.end > reset
    rig.joints(ROBOT.home, stamp=reset)
    rig.frames(stamp=reset)
    rig.worker.finish()
    np.testing.assert_allclose(rig.out.trajectories[-1].positions[0], ROBOT.home, atol=1e-9)


def test_a_frame_ahead_of_the_nodes_clock_is_planned_at_its_own_time():
    # The frame's /clock message still queued: a lockstep run planned its chunk 10 ms early
    # or not depending on the executor's order.
    rig = Rig()
    rig.start()
    rig.worker.finish()                       # the run's first chunk
    rig.advance(0.2, frames=False)
    frame = rig.clock.t + 0.01
    rig.joints(stamp=frame)
    rig.frames(stamp=frame)
    request = rig.worker.finish()
    assert request.t_obs == pytest.approx(frame)
    assert rig.out.trajectories[-1].start == pytest.approx(frame)
    far = rig.clock.t + 5.0                   # stamps on another clock: the node's time
    rig.advance(0.2, frames=False)
    rig.joints(stamp=far)
    rig.frames(stamp=far)
    assert rig.worker.finish().t_obs == pytest.approx(rig.clock.t)


def test_a_frame_waits_for_the_joint_state_of_its_instant():
    # The simulator publishes both at one instant; the images were handled first and the
    # request used the state 20 ms before: lockstep runs differed by up to 0.1 rad.
    rig = Rig()
    rig.start()
    rig.worker.finish()                       # the run's first chunk
    rig.advance(0.18, frames=False)
    rig.clock.t += 0.02
    frame = rig.clock.t
    rig.frames(stamp=frame)                   # the state at `frame` is still queued
    assert rig.worker.pending is None
    rig.joints(stamp=frame)                   # it arrives: the request goes out at once
    assert rig.worker.pending is not None
    assert rig.worker.pending.joint.stamp == frame
    rig.worker.finish()
    rig.advance(0.2, frames=False)
    rig.joints(stamp=rig.clock.t - 5.0)       # a state far behind the frames: not waited for
    rig.frames(stamp=rig.clock.t)
    assert rig.worker.pending is not None


def test_a_frame_waits_for_its_state_however_far_the_state_stream_lags_on_a_stopped_clock():
    # CI under load: the joint states of the last 0.1 s were still queued when the frame came,
    # and a state exactly 0.1 s behind counted as 'on another clock': the lockstep runs with
    # 0 s and 0.3 s of inference differed by 3e-2 rad.
    rig = Rig()
    rig.start()
    rig.worker.finish()                       # the run's first chunk
    rig.advance(0.2, frames=False)
    frame = rig.clock.t                       # the simulator's clock stops at the frame
    rig.joints(stamp=frame - 0.1)
    rig.frames(stamp=frame)
    rig.rt.tick()
    assert rig.worker.pending is None
    rig.joints(stamp=frame)
    assert rig.worker.pending is not None and rig.worker.pending.joint.stamp == frame
    rig.worker.finish()
    # A free-running clock that moves on past the frame does not wait for a lagging stream.
    rig.advance(0.2, frames=False)
    frame = rig.clock.t
    rig.joints(stamp=frame - 0.1)
    rig.frames(stamp=frame)
    assert rig.worker.pending is None
    rig.clock.t += 0.12
    rig.rt.tick()
    assert rig.worker.pending is not None and rig.worker.pending.joint.stamp == frame - 0.1
    rig.worker.finish()
    # The node's /clock 0.11 s behind the frame and the state 0.08 s behind it (seen in the
    # same lockstep test): both wait for the frame's instant.
    rig.advance(0.2, frames=False)
    frame = rig.clock.t + 0.11
    rig.joints(stamp=frame - 0.08)
    rig.frames(stamp=frame)
    assert rig.worker.pending is None
    rig.joints(stamp=frame)
    request = rig.worker.finish()
    assert request.joint.stamp == frame and request.t_obs == pytest.approx(frame)


def test_a_chunk_in_flight_when_the_robot_holds_is_dropped():
    rig = Rig(joint_state_timeout_s=0.25)
    rig.start()
    rig.advance(0.3, inputs=False)            # held while the request was running
    n = len(rig.out.trajectories)
    rig.worker.finish()
    assert rig.rt.chunks_produced == 0 and len(rig.out.trajectories) == n


# ------------------------------------------------------------------------- outputs
def test_ee_delta_streams_twists_at_control_rate_and_zeros_while_holding():
    class Deltas(Creep):
        def infer(self, obs):
            return {'actions': np.hstack([np.full((10, 6), 0.001), np.full((10, 1), 0.04)]),
                    'dt': 0.1}

    rig = Rig(action_mode='ee_delta', joint_state_timeout_s=0.25)
    rig.policy = rig.rt.policy = Deltas()
    rig.start()
    rig.worker.finish()
    rig.advance(0.1)
    assert np.abs(rig.out.twists[-1]).max() > 0 and rig.out.trajectories == []
    assert rig.out.chunks[0]['names'] == ['x', 'y', 'z', 'rx', 'ry', 'rz']
    rig.advance(0.3, inputs=False)
    assert rig.rt.state == RunState.HOLD
    assert all(np.all(t == 0.0) for t in rig.out.twists[-3:])


def test_gripper_commands_stay_in_the_hands_range_and_change_past_the_deadband():
    class Wide(Creep):
        def infer(self, obs):
            out = super().infer(obs)
            out['actions'][:, 7] = 0.09
            return out

    rig = Rig()
    rig.policy = rig.rt.policy = Wide()
    rig.start()
    rig.worker.finish()
    rig.advance(0.3)
    widths = [w for w, _ in rig.out.grippers]
    assert widths and all(0.0 <= w <= ROBOT.gripper.max_width for w in widths)
    assert len(widths) == len(set(widths)), 'a command only on change'


def test_status_counts_missed_ticks_and_the_image_to_trajectory_latency():
    rig = Rig()
    rig.start()
    rig.clock.t += 0.1                        # four ticks missed
    rig.rt.tick()
    rig.clock.t += 0.03
    rig.worker.finish()
    status = rig.rt.status()
    assert status.missed_ticks == 4
    assert status.chunks_produced == 1 and status.state == RunState.RUNNING
    assert status.e2e_latency_p50_ms == pytest.approx(130.0, abs=1e-6)
    assert status.control_rate_hz > 0


# ------------------------------------------------------------------------- worker
def test_the_worker_refuses_while_busy_and_outlives_a_failing_request():
    import threading

    from iflybot_vla_policy.runtime.worker import InferenceWorker

    release, done = threading.Event(), threading.Event()
    handled: list[str] = []

    def handle(request: str) -> None:
        if request == 'fail':
            raise RuntimeError('model crashed')
        release.wait(10)
        handled.append(request)
        done.set()

    worker = InferenceWorker(handle)
    try:
        assert worker.submit('fail')
        while worker.busy:                 # the failure is printed, the worker goes on
            threading.Event().wait(0.001)
        assert worker.submit('a')
        assert not worker.submit('b'), 'one request at a time; submit never blocks'
        release.set()
        assert done.wait(10) and handled == ['a']
    finally:
        worker.stop()


def test_a_params_file_typo_is_named_with_the_closest_parameter():
    from iflybot_vla_policy.runtime.config import unknown_parameters

    assert unknown_parameters(['contrl_rate_hz', 'control_rate_hz', 'zzz']) == [
        "unknown parameter 'contrl_rate_hz' ignored; did you mean 'control_rate_hz'?",
        "unknown parameter 'zzz' ignored"]


# ------------------------------------------------------------------------- real-time chunking
class InpaintingCreep(Creep):
    """Creep that does real-time chunking as Policy.infer does: the first `inference_delay`
    actions come back as `previous` had them."""

    def __init__(self) -> None:
        super().__init__()
        self.prefixes: list[tuple[np.ndarray | None, int]] = []

    def infer(self, obs: dict, previous: np.ndarray | None = None,
              inference_delay: int = 0) -> dict:
        out = super().infer(obs)
        self.prefixes.append((previous, inference_delay))
        if previous is not None:
            out['actions'][:inference_delay] = previous[:inference_delay]
        return out


def test_rtc_requests_carry_the_executing_plan_from_the_observation_on_and_the_delay():
    rig = Rig(execution_strategy='rtc', commit_latency_s=0.05)
    rig.policy = rig.rt.policy = InpaintingCreep()
    rig.start()
    assert rig.worker.pending.previous is None            # nothing executes yet
    rig.clock.t += 0.25                                   # 0.25 s of inference
    rig.worker.finish()
    rig.advance(0.2)
    request = rig.worker.pending
    plan = rig.rt.executor.plan
    n = int((plan.end - request.t_obs) / 0.1 + 1e-9) + 1   # what is left of the plan
    assert request.previous.shape == (n, 8)
    np.testing.assert_allclose(request.previous,
                               plan.at(request.t_obs + 0.1 * np.arange(n)), atol=1e-12)
    assert request.inference_delay == 3                   # ceil((0.25 + 0.05) / 0.1)
    rig.clock.t += 0.05
    rig.worker.finish()
    new = rig.rt.executor.plan                            # replaced, continuing the old one
    assert new.times[0] == pytest.approx(request.t_obs)
    np.testing.assert_allclose(new.values[:3], request.previous[:3], atol=1e-12)
    assert rig.rt.status().last_error == ''


def test_rtc_is_refused_for_a_remote_policy_and_one_that_cannot_continue_a_chunk():
    with pytest.raises(ValueError, match='parameter execution_strategy'):
        parse_config({'execution_strategy': 'rtc', 'inference_backend': 'remote',
                      'server_uri': 'ws://localhost:8000'}, ROBOT)
    cfg = parse_config({'execution_strategy': 'rtc', 'preset': 'tiny'}, ROBOT)
    with pytest.raises(ValueError, match="execution_strategy 'rtc' needs a policy"):
        load_policy(cfg, ROBOT, lambda cfg: Creep(), warn=print)
    loaded = load_policy(cfg, ROBOT, lambda cfg: InpaintingCreep(), warn=print)
    assert loaded.policy.prefixes == [(None, 0)]          # the warm-up, without a plan


# ------------------------------------------------------------------------- time alignment
def test_an_observation_whose_joint_state_lags_its_frames_is_refused_naming_it_and_resumes():
    rig = Rig()
    rig.start()
    rig.worker.finish()                         # in sync: the first chunk
    assert rig.rt.status().observation_skew_max_ms == pytest.approx(0.0, abs=1e-6)
    for _ in range(30):                         # the joint driver's stamps fall 0.45 s behind
        rig.clock.t += 0.02
        rig.joints(stamp=rig.clock.t - 0.45)
        if round(rig.clock.t / 0.02) % 10 == 0:
            rig.frames()
        rig.rt.tick()
    assert (rig.rt.state, rig.cause) == (RunState.HOLD, HoldCause.OBSERVATION)
    status = rig.rt.status()
    # (the request waits 0.1 s and more for the frames' state: the nearest then is 0.33 s
    # before them; the limit is 1.5 times the 0.16 s median frame interval so far)
    assert 'observation out of sync: joint_states -330.0 ms from the frames (limit 240.0 ms)' \
        in status.last_error, status.last_error
    assert status.observation_skew_max_ms == pytest.approx(330.0, abs=0.5)
    assert rig.worker.pending is None and at_rest(rig.out.trajectories[-1])
    rig.advance(0.4)                            # back on one clock
    rig.worker.finish()
    assert rig.rt.state == RunState.RUNNING
    assert 'observation_skew_p50_ms' in rig.rt.stats.diagnostic_values()


def feed_offset_cameras(rig: Rig, q_at_last: np.ndarray) -> None:
    """0.6 s of a scene camera at 5 Hz and a wrist camera 0.12 s after it, joint states at each
    frame (`q_at_last` at the last scene frame); the clock follows the stamps."""
    t = rig.clock.t
    for k in range(1, 4):
        rig.clock.t = t + 0.2 * k
        rig.joints(q_at_last if k == 3 else None)
        rig.rt.on_image(CAMERAS[0], np.full((4, 4, 3), k, np.uint8), rig.clock.t)
        rig.clock.t = t + 0.2 * k + 0.12
        rig.joints(ROBOT.home)
        rig.rt.on_image(CAMERAS[1], np.full((4, 4, 3), 10 + k, np.uint8), rig.clock.t)
        if k < 3 and rig.worker.pending is not None:
            rig.worker.finish()



def test_an_out_of_sync_hold_names_why_the_newer_joint_states_were_refused():
    # test_fault_matrix: joint states with a renamed joint are refused; before the watchdog
    # calls them stale, the frames run ahead of the last good state, and the hold said only
    # 'out of sync' where the user needs the joint's name.
    rig = Rig()
    rig.start()
    rig.worker.finish()
    for _ in range(15):
        rig.clock.t += 0.02
        rig.rt.on_refused_input('joint_states', "joint state lacks joint(s) ['fr3_joint3']")
        if round(rig.clock.t / 0.02) % 10 == 0:
            rig.frames()
        rig.rt.tick()
    error = rig.rt.status().last_error
    assert rig.rt.state == RunState.HOLD and "lacks joint(s) ['fr3_joint3']" in error, error

def test_the_frames_and_state_nearest_to_the_frames_stamp_make_the_observation():
    # The wrist camera's frames come 0.12 s after the scene camera's: an observation takes
    # the newest frame set's oldest stamp (the scene frame's) and, of the wrist frames and the
    # joint states, those nearest to it.
    rig = Rig(max_observation_skew_s=0.15)
    rig.start()
    rig.worker.finish()
    q = ROBOT.home.copy()
    q[0] += 0.05
    feed_offset_cameras(rig, q)
    request = rig.worker.pending
    assert request is not None and request.images[CAMERAS[0]][0, 0, 0] == 3
    assert request.images[CAMERAS[1]][0, 0, 0] == 12      # 0.08 s before, not 0.12 s after
    np.testing.assert_allclose(request.joint.q, q)        # the state at the frames' stamp
    assert rig.rt.status().observation_skew_max_ms == pytest.approx(120.0, abs=0.5)
    strict = Rig(max_observation_skew_s=0.05)
    strict.start()
    strict.worker.finish()
    feed_offset_cameras(strict, q)
    assert strict.cause == HoldCause.OBSERVATION and strict.worker.pending is None
    assert 'observation out of sync: wrist_camera' in strict.rt.status().last_error
    assert '(limit 50.0 ms)' in strict.rt.status().last_error


def test_the_remote_backend_speaks_the_configured_wire_format():
    # A pi0/pi0.5-DROID server expects DROID's keys and units: the node selects the mapping.
    cfg = parse_config({'inference_backend': 'remote', 'server_uri': 'ws://127.0.0.1:9',
                        'wire_format': 'droid', 'warmup_inferences': 0}, ROBOT)
    loaded = load_policy(cfg, ROBOT, None, warn=lambda text: None)   # no server: it holds
    assert loaded.policy.wire_format == 'droid'
    with pytest.raises(ValueError, match="parameter wire_format: .*'droid'"):
        parse_config({'wire_format': 'openpi', 'preset': 'tiny'}, ROBOT)
