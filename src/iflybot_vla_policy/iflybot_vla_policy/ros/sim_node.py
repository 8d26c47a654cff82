"""`iflybot_sim`: the MuJoCo FR3 behind franka_ros2's topics (a policy cannot tell it apart).

Publishes joint_states, both cameras' image_raw + camera_info, /clock, sim/task_success,
sim/object_poses and sim/instruction; follows fr3_arm_controller/joint_trajectory
(JointTrajectoryController semantics), servo_node/delta_twist_cmds and vla/gripper_command;
service ~/reset (ResetSim). Topic names are relative, as a driver's are: /joint_states and so
on in the root namespace, under a namespace or remapping (`joint_states:=...`) otherwise.
Parameters: `SCHEMA` (a bad value fails the start naming it; docs/parameters.md).
Physics, control and tasks live in iflybot_vla_policy.sim; this node only converts and paces.
The simulation runs on its own thread (real time by default); callbacks take the same lock.
"""
from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import rclpy
from geometry_msgs.msg import TwistStamped
from iflybot_vla_msgs.msg import ActionChunk, GripperCommand, ObjectPoses
from iflybot_vla_msgs.srv import ResetSim
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Bool, String
from trajectory_msgs.msg import JointTrajectory

from iflybot_vla_policy.params import Param, Schema
from iflybot_vla_policy.ros.conversions_sim import (
    camera_info_msg,
    image_msg,
    joint_state_msg,
    object_poses_msg,
    to_time,
    trajectory_from_msg,
)
from iflybot_vla_policy.ros.parameters import ParameterError, load_parameters
from iflybot_vla_policy.ros.servo_switch import SERVICE as SERVO_SWITCH_SERVICE
from iflybot_vla_policy.ros.servo_switch import servo_command_type
from iflybot_vla_policy.sim import CAMERAS, TASKS, SimEnv, TrajectoryError, make_env
from iflybot_vla_policy.sim.env import REFLEX_MODES

_BASE_FRAMES = ('', 'fr3_link0', 'base', 'world')
LOCKSTEP_REPEAT_S = 1.0    # wall s a paused frame waits before its messages go out again
_TCP_FRAMES = ('fr3_hand_tcp', 'tcp')
# Absolute: rclpy's time source (use_sim_time) listens on /clock whatever the namespace.
CLOCK_TOPIC = '/clock'


SCHEMA = Schema('iflybot_sim', (
    Param('task', 'pick_place', 'task of the first scene (~/reset switches it)',
          choices=tuple(sorted(TASKS))),
    Param('seed', 0, 'seed of the first scene (reset gives others)', ge=0),
    Param('real_time_factor', 1.0, 'sim seconds per wall second; 0 runs as fast as possible',
          ge=0.0, le=100.0),
    Param('joint_state_rate', 100.0, 'joint_states rate in sim Hz', ge=1.0, le=500.0),
    Param('clock_rate', 100.0, '/clock rate in sim Hz', ge=1.0, le=500.0),
    Param('camera_rate', 15.0, 'image + camera_info rate in sim Hz (0 = off)', ge=0.0, le=60.0),
    Param('success_rate', 5.0, 'sim/task_success rate in sim Hz', ge=0.1, le=100.0),
    Param('object_pose_rate', 25.0, 'sim/object_poses rate in sim Hz (0 = off)', ge=0.0,
          le=500.0),
    Param('image_width', 320, 'width of both cameras in px', ge=16, le=1920),
    Param('image_height', 240, 'height of both cameras in px', ge=16, le=1080),
    Param('home_noise', 0.05, 'uniform noise on the home joint angles at reset, rad', ge=0.0,
          le=0.3),
    Param('twist_timeout', 0.2, 'Servo stops after this long without a twist, s', ge=0.01,
          le=5.0),
    Param('allow_nonzero_velocity_at_trajectory_end', False,
          'JTC: accept trajectories whose last point still moves'),
    Param('libfranka_reflexes', 'report',
          "libfranka's limits on the 1 kHz command stream: 'abort' stops the motion and holds "
          "as the FR3 does, 'report' logs only, 'off'", choices=REFLEX_MODES),
    Param('lockstep_timeout_s', 5.0,
          'lockstep (ResetSim.lockstep): wall seconds a frame waits for an answer of the '
          'policy before the simulation goes on without it', ge=0.1, le=600.0),
))


class SimNode(Node):
    def __init__(self, **kwargs: object) -> None:
        super().__init__('iflybot_sim', **kwargs)
        p = self._params = load_parameters(self, SCHEMA)
        self._lock = threading.Lock()
        self._clock_offset = 0.0          # sim clock = offset + env.time (monotonic over resets)
        self._reset_stamp = 0.0           # sim clock when the last reset's scene began
        self._rejected = 0
        self._reflexes_logged = 0
        # OpenGL contexts belong to one thread: the physics thread creates, resets and renders
        # the env; the service callback hands resets over through _reset_request.
        self._reset_request: tuple[str, int] | None = None
        self._reset_done = threading.Event()
        self._reset_result: tuple[bool, str] = (False, '')
        self._env_ready = threading.Event()
        self._env_error: BaseException | None = None
        self._go = threading.Event()      # publishers exist: the loop may start
        self._running = True
        self.failed = False
        # Lockstep (ResetSim.lockstep): the frame stamp the loop waits on, and its answer
        self._lockstep = False
        self._waiting_on: float | None = None
        self._answer = threading.Condition()
        self._chunk_answered = False
        self._trajectory_answered = False
        self._thread = threading.Thread(target=self._run, name='iflybot_sim_physics',
                                        daemon=True)
        self._thread.start()
        self._env_ready.wait()
        if self._env_error is not None:
            raise self._env_error
        qos = 10
        self._joint_pub = self.create_publisher(JointState, 'joint_states', qos)
        # The arm controller's reference (what JTC calls the desired state): position, velocity,
        # and acceleration in the effort field; for plots and for checking continuity.
        self._reference_pub = self.create_publisher(JointState, '~/reference', qos)
        self._clock_pub = self.create_publisher(Clock, CLOCK_TOPIC, qos)
        self._success_pub = self.create_publisher(Bool, 'sim/task_success', qos)
        # Ground truth a perception stack would estimate (the push expert re-plans from it).
        self._objects_pub = self.create_publisher(ObjectPoses, 'sim/object_poses', qos)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._instruction_pub = self.create_publisher(String, 'sim/instruction', latched)
        self._image_pubs = {c: self.create_publisher(Image, f'{c}/color/image_raw', 2)
                            for c in CAMERAS}
        self._info_pubs = {c: self.create_publisher(CameraInfo, f'{c}/color/camera_info', 2)
                           for c in CAMERAS}
        self.create_subscription(JointTrajectory, 'fr3_arm_controller/joint_trajectory',
                                 self._on_trajectory, 10)
        self.create_subscription(TwistStamped, 'servo_node/delta_twist_cmds', self._on_twist, 10)
        self.create_subscription(GripperCommand, 'vla/gripper_command', self._on_gripper, 10)
        self.create_subscription(ActionChunk, 'vla/action_chunk', self._on_chunk, 10)
        self.create_service(ResetSim, '~/reset', self._on_reset)
        # Servo's command type (moveit_msgs/srv/ServoCommandType where installed): like MoveIt
        # Servo, the stand-in starts in JOINT_JOG and ignores twists until switched to TWIST.
        self._servo_srv, servo_type = servo_command_type()
        self._servo_command_type = self._servo_srv.Request.JOINT_JOG
        self._ignored_twist_warned = 0.0
        # relative, as the twist topic: /servo_node/switch_command_type in the root namespace
        self.create_service(self._servo_srv, SERVO_SWITCH_SERVICE.lstrip('/'),
                            self._on_switch_command_type)
        self.get_logger().info(f'Servo stand-in in JOINT_JOG: call {SERVO_SWITCH_SERVICE} '
                               f'({servo_type}) with TWIST before sending twists')
        self._publish_instruction()
        self._go.set()
        self.get_logger().info(
            f'simulating {p["task"]} (seed {p["seed"]}): "{self._env.instruction}"; '
            f'real_time_factor {p["real_time_factor"]}')

    def _make_env(self, task: str, seed: int) -> SimEnv:
        p = self._params
        size = (int(p['image_height']), int(p['image_width']))
        return make_env(task, seed=seed, image_size=size, render=p['camera_rate'] > 0,
                        home_noise=float(p['home_noise']),
                        allow_nonzero_velocity_at_trajectory_end=bool(
                            p['allow_nonzero_velocity_at_trajectory_end']),
                        twist_timeout=float(p['twist_timeout']),
                        reflexes=str(p['libfranka_reflexes']))

    # ----------------------------------------------------------------------------- callbacks
    @property
    def sim_time(self) -> float:
        return self._clock_offset + self._env.time

    def _on_chunk(self, msg: ActionChunk) -> None:
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        with self._answer:
            if self._waiting_on is not None and stamp >= self._waiting_on - 1e-6:
                self._chunk_answered = True
                self._answer.notify_all()

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        # Applied before it counts as the answer: a lockstep loop let go first would step the
        # old trajectory (and start this one a tick late).
        self._apply_trajectory(msg)
        with self._answer:
            if self._waiting_on is not None:
                self._trajectory_answered = True
                self._answer.notify_all()

    def _apply_trajectory(self, msg: JointTrajectory) -> None:
        with self._lock:
            try:
                traj = trajectory_from_msg(msg, self._clock_offset)
                self._env.command_joint_trajectory(traj)
                ahead = traj.start_time - self._env.time
                if ahead > 5.0:
                    self.get_logger().warning(
                        f'trajectory starts {ahead:.1f} s in the future on the sim clock; '
                        f'stamp it 0 (now) or run the sender with use_sim_time:=true')
            except TrajectoryError as err:
                self._rejected += 1
                self.get_logger().error(f'rejected trajectory: {err}')

    def _on_switch_command_type(self, request: Any, response: Any) -> Any:
        req = self._servo_srv.Request
        names = {req.JOINT_JOG: 'JOINT_JOG', req.TWIST: 'TWIST', req.POSE: 'POSE'}
        wanted = request.command_type
        # The stand-in follows twists only; JOINT_JOG (its idle state) is accepted too.
        response.success = wanted in (req.JOINT_JOG, req.TWIST)
        if response.success:
            self._servo_command_type = wanted
            self.get_logger().info(f'Servo command type: {names[wanted]}')
        else:
            self.get_logger().error(f'Servo command type {names.get(wanted, wanted)} is not '
                                    f'supported by the simulator (JOINT_JOG or TWIST)')
        return response

    def _on_twist(self, msg: TwistStamped) -> None:
        if self._servo_command_type != self._servo_srv.Request.TWIST:
            now = time.monotonic()
            if now - self._ignored_twist_warned > 5.0:
                self.get_logger().warning(
                    f'ignored twist: Servo is in JOINT_JOG mode (call {SERVO_SWITCH_SERVICE} '
                    f'with TWIST first, as MoveIt Servo requires)')
                self._ignored_twist_warned = now
            return
        frame = msg.header.frame_id
        if frame in _BASE_FRAMES:
            frame = 'base'
        elif frame in _TCP_FRAMES:
            frame = 'tcp'
        else:
            self.get_logger().error(f"ignored twist in unknown frame '{frame}' (use "
                                    f"{_BASE_FRAMES[1]} or {_TCP_FRAMES[0]})")
            return
        lin, ang = msg.twist.linear, msg.twist.angular
        with self._lock:
            try:
                self._env.command_twist([lin.x, lin.y, lin.z], [ang.x, ang.y, ang.z], frame)
            except ValueError as err:
                self.get_logger().error(f'ignored twist: {err}')

    def _on_gripper(self, msg: GripperCommand) -> None:
        with self._lock:
            try:
                self._env.command_gripper(msg.width, msg.speed, msg.force, msg.grasp)
            except ValueError as err:
                self.get_logger().error(f'ignored gripper command: {err}')

    def _on_reset(self, request: ResetSim.Request,
                  response: ResetSim.Response) -> ResetSim.Response:
        task = request.task or self._env.task_name
        if task not in TASKS:
            response.success = False
            response.message = f'unknown task {task!r}; choose from {sorted(TASKS)}'
            return response
        self._reset_done.clear()
        with self._lock:
            self._reset_request = (task, int(request.seed), bool(request.lockstep))
        with self._answer:              # a loop waiting on the old scene's frame lets go
            self._answer.notify_all()
        if not self._reset_done.wait(timeout=60.0):
            response.success = False
            response.message = 'reset timed out (simulation thread busy or stopped)'
            return response
        response.success, response.message = self._reset_result
        response.instruction = self._env.instruction
        if response.success:
            response.stamp = to_time(self._reset_stamp)
            self._publish_instruction()
            self.get_logger().info(f'{response.message}: "{response.instruction}"')
        return response

    def _do_reset(self, task: str, seed: int, lockstep: bool) -> None:
        """On the physics thread, with the lock held; the sim clock stays continuous."""
        self._lockstep = lockstep
        try:
            self._clock_offset += self._env.time
            if task != self._env.task_name:
                self._env.close()
                self._env = self._make_env(task, seed)
            else:
                self._env.reset(seed)
            self._clock_offset -= self._env.time   # reset settles objects for a moment
            # The new scene starts one physics tick later than the old one's last messages,
            # which a lockstep pause publishes at the very instant of the reset: with equal
            # stamps, the old pose counted as 'stamped at or after the reset' (inputs_after).
            self._clock_offset += self._env.model.opt.timestep
            self._reset_stamp = self.sim_time     # earlier messages show the old scene
            self._reset_result = (True, f'reset {task} with seed {seed}'
                                        + (' (lockstep)' if lockstep else ''))
        except Exception as err:  # noqa: BLE001 - the reply carries the reason
            self._reset_result = (False, f'reset failed: {err!r}')
        self._reset_done.set()

    def _publish_instruction(self) -> None:
        self._instruction_pub.publish(String(data=self._env.instruction))

    # ----------------------------------------------------------------------------- sim loop
    def _run(self) -> None:
        try:
            self._env = self._make_env(self._params['task'], int(self._params['seed']))
        except BaseException as err:  # noqa: BLE001 - re-raised in __init__
            self._env_error = err
            return
        finally:
            self._env_ready.set()
        self._go.wait()
        try:
            self._loop()
        except Exception as err:  # noqa: BLE001 - report, then let the process end
            if not self._running or not self.context.ok():
                return        # shutting down (e.g. Ctrl-C invalidated the context mid-publish)
            self.get_logger().fatal(f'simulation thread failed: {err!r}')
            self._running = False
            self.failed = True
            self.context.try_shutdown()      # ends spin(); main() exits non-zero
        finally:
            self._env.close()

    def _loop(self) -> None:
        p = self._params
        tick = 1.0 / max(p['joint_state_rate'], p['clock_rate'])
        periods = {'joint': 1.0 / p['joint_state_rate'], 'clock': 1.0 / p['clock_rate'],
                   'success': 1.0 / p['success_rate'],
                   'objects': (1.0 / p['object_pose_rate'] if p['object_pose_rate'] > 0
                               else math.inf),
                   'camera': 1.0 / p['camera_rate'] if p['camera_rate'] > 0 else math.inf}
        due = dict.fromkeys(periods, 0.0)
        rtf = float(p['real_time_factor'])
        wall0, sim0 = time.monotonic(), None
        behind_warned = time.monotonic()   # no warning in the first seconds (GL start-up)
        while self._running and rclpy.ok(context=self.context):
            with self._lock:
                if self._reset_request is not None:
                    self._do_reset(*self._reset_request)
                    self._reset_request = None
                    if self._lockstep:   # the new scene's first frame at its first instant
                        due = dict.fromkeys(periods, 0.0)
                now = self.sim_time
                if sim0 is None:
                    sim0 = now
                if now < sim0:          # clock offset changed by a reset: restart pacing
                    wall0, sim0 = time.monotonic(), now
                # The answer is awaited before the frame goes out: a fast policy's answer
                # may arrive before the frame's publish returns.
                lockstep = self._lockstep and now >= due['camera']
                if lockstep:
                    with self._answer:
                        self._waiting_on = now
                        self._chunk_answered = self._trajectory_answered = False
                self._publish_due(now, due, periods)
            if lockstep:
                self._wait_for_answer(now, periods)
                wall0, sim0 = time.monotonic(), now   # the pause is not lag to catch up
            with self._lock:
                if self._reset_request is not None:
                    continue           # reset during the pause: the old scene does not step
                self._env.step(float(tick))
                after = self.sim_time
                self._log_reflexes()
            if rtf > 0:
                wait = wall0 + (after - sim0) / rtf - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                elif wait < -0.5:       # too slow: do not try to catch up, re-anchor
                    if time.monotonic() - behind_warned > 10.0:
                        self.get_logger().warning(
                            f'simulation slower than real_time_factor {rtf} (camera rate and '
                            f'image size cost the most)')
                        behind_warned = time.monotonic()
                    wall0, sim0 = time.monotonic(), after

    def _log_reflexes(self) -> None:
        """One error line per new violation of libfranka's limits (env.reflexes, this scene)."""
        reflexes = self._env.reflexes
        if len(reflexes) < self._reflexes_logged:     # a reset started a new list
            self._reflexes_logged = 0
        for reflex in reflexes[self._reflexes_logged:]:
            action = ('motion aborted, holding' if self._env.reflex_mode == 'abort'
                      else 'the FR3 would abort here')
            self.get_logger().error(f'reflex {reflex} ({action})')
        self._reflexes_logged = len(reflexes)

    def _wait_for_answer(self, stamp: float, periods: dict[str, float]) -> None:
        """Lockstep: hold the clock at the frame `stamp` until the policy's chunk for it and a
        trajectory have arrived, a reset is requested, or lockstep_timeout_s passes. Every
        LOCKSTEP_REPEAT_S without an answer the frame's clock, joint state and images go out
        again, same stamps: a best-effort message lost under load (or a wake-up an executor
        missed) would otherwise stop both sides until the timeout, as nothing else moves."""
        timeout = float(self._params['lockstep_timeout_s'])
        deadline = time.monotonic() + timeout
        repeat_at = time.monotonic() + LOCKSTEP_REPEAT_S
        with self._answer:
            while not (self._chunk_answered and self._trajectory_answered):
                left = deadline - time.monotonic()
                if left <= 0 or not self._running or self._reset_request is not None:
                    break
                if time.monotonic() >= repeat_at:
                    self._answer.release()
                    try:
                        with self._lock:
                            if self._reset_request is None:
                                self._publish_due(stamp, self._repeat_due(periods), periods)
                    finally:
                        self._answer.acquire()
                    repeat_at = time.monotonic() + LOCKSTEP_REPEAT_S
                    continue
                self._answer.wait(min(left, repeat_at - time.monotonic(), 0.1))
            answered = self._chunk_answered and self._trajectory_answered
            self._waiting_on = None
        if not answered and self._reset_request is None and self._running:
            self.get_logger().warning(
                f'lockstep: no answer to the frame at {stamp:.3f} s within {timeout} s '
                '(policy holding or idle?): going on', throttle_duration_sec=10.0)

    @staticmethod
    def _repeat_due(periods: dict[str, float]) -> dict[str, float]:
        """A schedule on which the clock, joint state and camera are due, nothing else."""
        return {k: 0.0 if k in ('clock', 'joint', 'camera') else math.inf for k in periods}

    def _publish_due(self, now: float, due: dict[str, float], periods: dict[str, float]) -> bool:
        """Publish what is due at `now`; True when a camera frame went out."""
        env = self._env
        if now >= due['clock']:
            self._clock_pub.publish(Clock(clock=to_time(now)))
            due['clock'] = now + periods['clock'] - 1e-9
        if now >= due['joint']:
            self._joint_pub.publish(joint_state_msg(
                env.joint_names, env.joint_positions, env.joint_velocities, env.joint_efforts,
                now))
            ref = env.desired
            self._reference_pub.publish(joint_state_msg(
                env.robot.arm_joint_names, ref.positions, ref.velocities, ref.accelerations, now))
            due['joint'] = now + periods['joint'] - 1e-9
        if now >= due['success']:
            self._success_pub.publish(Bool(data=env.success()))
            due['success'] = now + periods['success'] - 1e-9
        if now >= due['objects']:
            self._objects_pub.publish(object_poses_msg(env.objects(), now))
            due['objects'] = now + periods['objects'] - 1e-9
        if now >= due['camera']:
            for camera, rgb in env.render().items():
                frame = f'{camera}_color_optical_frame'
                self._image_pubs[camera].publish(image_msg(rgb, now, frame))
                self._info_pubs[camera].publish(
                    camera_info_msg(env.camera_info(camera), now, frame))
            due['camera'] = now + periods['camera'] - 1e-9
            return True
        return False

    def shutdown(self) -> None:
        self._running = False
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

    @property
    def rejected_trajectories(self) -> int:
        return self._rejected


def main(argv: Sequence[str] | None = None) -> int:
    rclpy.init(args=list(sys.argv if argv is None else argv))
    node = None
    code = 0
    try:
        node = SimNode()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ParameterError:
        code = 1          # the node logged which parameter, before anything started
    finally:
        if node is not None:
            node.shutdown()
            code = 1 if node.failed else 0
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return code


if __name__ == '__main__':
    sys.exit(main())
