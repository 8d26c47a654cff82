"""`iflybot_expert_teleop`: the scripted expert drives the simulator node, episode after episode.

It uses only what a policy node uses (so recorded demos exercise the real path): per episode it
resets `iflybot_sim` (`~/reset`), starts the recorder (`~/start_episode`), publishes the
instruction, then each chunk: the expert plans on a local, render-free copy of the scene (same
task and seed, arm and fingers synchronised from /joint_states), and the chunk goes out as a
JointTrajectory (stamped with its start on the simulator clock, JTC semantics), GripperCommands
when the width changes, and an ActionChunk. It paces itself on the simulator's clock (the
stamps of /joint_states), so a simulator faster or slower than real time is fine. The episode
ends when the expert is done or after `max_episode_s`; the recorder is stopped with the
simulator's /sim/task_success verdict.

The local copy's movable objects follow /sim/object_poses (iflybot_vla_msgs/ObjectPoses, what
a perception stack would publish; the recorder keeps them), so experts that re-plan from live
object poses during contact (push) work through ROS as they do inside the simulator.
Parameters: `SCHEMA` (a bad value fails the start naming it; docs/parameters.md).
"""
from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import mujoco
import numpy as np
import rclpy
from builtin_interfaces.msg import Duration
from iflybot_vla_msgs.msg import ActionChunk, GripperCommand, ObjectPoses
from iflybot_vla_msgs.srv import ResetSim, StartEpisode, StopEpisode
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from iflybot_vla_policy.params import Param, Schema
from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.ros.conversions_sim import object_poses_from_msg
from iflybot_vla_policy.ros.parameters import ParameterError, load_parameters
from iflybot_vla_policy.sim import TASKS, make_env
from iflybot_vla_policy.sim.env import chunk_to_trajectory
from iflybot_vla_policy.sim.expert import ScriptedExpert

# Tasks whose expert re-plans from live object poses during contact: an episode waits for
# /sim/object_poses of the new scene.
LIVE_POSE_TASKS = frozenset({'push'})

SCHEMA = Schema('iflybot_expert_teleop', (
    Param('task', 'pick_place', 'simulator task of every episode', choices=tuple(sorted(TASKS))),
    Param('episodes', 10, 'number of episodes to run', ge=0),
    Param('first_seed', 0, 'seed of the first episode (then +1 each)', ge=0),
    Param('max_episode_s', 25.0, 'sim seconds before giving up', gt=0.0),
    Param('horizon', 10, 'actions per JointTrajectory chunk', ge=1),
    Param('dt', 0.05, 'seconds between actions', gt=0.0),
    Param('only_successful', False,
          'discard (instead of keeping) episodes the sim judges failed'),
    Param('record', True, 'call the recorder per episode'),
    Param('sim', '/iflybot_sim', 'simulator node name (its ~/reset service)'),
    Param('recorder', '/iflybot_recorder', 'recorder node name (its episode services)'),
    Param('joint_state_topic', '/joint_states',
          'sensor_msgs/JointState of the simulator: arm, fingers and its clock'),
    Param('success_topic', '/sim/task_success', 'std_msgs/Bool: the task succeeded'),
    Param('object_poses_topic', '/sim/object_poses',
          'iflybot_vla_msgs/ObjectPoses the local scene follows'),
    Param('trajectory_topic', '/fr3_arm_controller/joint_trajectory',
          'JointTrajectoryController topic: one trajectory per chunk'),
    Param('gripper_topic', '/vla/gripper_command', 'iflybot_vla_msgs/GripperCommand topic'),
    Param('chunk_topic', '/vla/action_chunk', 'iflybot_vla_msgs/ActionChunk of every chunk'),
    Param('instruction_topic', '/vla/instruction', "std_msgs/String: each episode's instruction"),
    Param('operator_name', 'expert', 'operator stored with episodes'),
    Param('settle_s', 0.6, 'sim seconds to wait after a reset', ge=0.0),
    Param('shutdown_when_done', True, 'exit after the last episode'),
))


@dataclass
class EpisodeOutcome:
    seed: int
    episode_id: str
    success: bool
    sim_duration: float
    recorded: bool
    message: str
    published: dict[str, int]          # topic -> messages this node published in the episode


def trajectory_msg(joint_names: tuple[str, ...], positions: np.ndarray, times: np.ndarray,
                   velocities: np.ndarray) -> JointTrajectory:
    """(P, 7) positions/velocities at times_from_start (P,) -> JointTrajectory (stamp 0 = now)."""
    msg = JointTrajectory()
    msg.joint_names = list(joint_names)
    for pos, vel, t in zip(positions, velocities, times, strict=True):
        sec = int(t)
        msg.points.append(JointTrajectoryPoint(
            positions=pos.tolist(), velocities=vel.tolist(),
            time_from_start=Duration(sec=sec, nanosec=int(round((t - sec) * 1e9)))))
    return msg


class ExpertTeleopNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__('iflybot_expert_teleop', **kwargs)
        p = load_parameters(self, SCHEMA)
        self.task = p['task']
        self.episodes, self.first_seed = p['episodes'], p['first_seed']
        self.max_episode_s = p['max_episode_s']
        self.horizon, self.dt = p['horizon'], p['dt']
        self.only_successful, self.record = p['only_successful'], p['record']
        self.operator_name = p['operator_name']
        self.settle_s = p['settle_s']
        self.shutdown_when_done = p['shutdown_when_done']
        self.object_poses_topic = p['object_poses_topic']
        self.robot = load_robot()
        self._cv = threading.Condition()
        self._js_time = -1.0                       # stamp of the newest joint state (sim s)
        self._js_positions: dict[str, float] = {}
        self._js_count = 0
        self._objects: dict[str, tuple[np.ndarray, np.ndarray]] = {}   # name: (xyz, wxyz)
        self._objects_time = -1.0                  # stamp of the newest object poses (sim s)
        self._success = False
        self.sent: Counter[str] = Counter()
        self.create_subscription(JointState, p['joint_state_topic'], self._on_joint_state, 50)
        self.create_subscription(Bool, p['success_topic'], self._on_success, 10)
        self.create_subscription(ObjectPoses, p['object_poses_topic'], self._on_objects, 10)
        self.traj_pub = self.create_publisher(JointTrajectory, p['trajectory_topic'], 10)
        self.gripper_pub = self.create_publisher(GripperCommand, p['gripper_topic'], 10)
        self.chunk_pub = self.create_publisher(ActionChunk, p['chunk_topic'], 10)
        self.instruction_pub = self.create_publisher(String, p['instruction_topic'], 10)
        sim, recorder = p['sim'].rstrip('/'), p['recorder'].rstrip('/')
        self.reset_client = self.create_client(ResetSim, f'{sim}/reset')
        self.start_client = self.create_client(StartEpisode, f'{recorder}/start_episode')
        self.stop_client = self.create_client(StopEpisode, f'{recorder}/stop_episode')
        self._shadow: Any = None
        self._ready_clients: set[str] = set()

    # ------------------------------------------------------------------------------ inputs
    def _on_joint_state(self, msg: JointState) -> None:
        with self._cv:
            self._js_time = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            self._js_positions = dict(zip(msg.name, msg.position, strict=False))
            self._js_count += 1
            self._cv.notify_all()

    def _on_objects(self, msg: ObjectPoses) -> None:
        try:
            poses = object_poses_from_msg(msg)
        except ValueError as err:
            self.get_logger().warning(f'ignoring object poses: {err}', throttle_duration_sec=5.0)
            return
        with self._cv:
            self._objects = poses
            self._objects_time = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            self._cv.notify_all()

    def _on_success(self, msg: Bool) -> None:
        self._success = bool(msg.data)

    def sim_time(self) -> float:
        with self._cv:
            return self._js_time

    def _sim_stamp(self) -> Any:
        """Now on the simulator's clock (the newest joint state's stamp) as a Time message."""
        from builtin_interfaces.msg import Time

        t = self.sim_time()
        sec = int(t)
        return Time(sec=sec, nanosec=min(int(round((t - sec) * 1e9)), 999_999_999))

    def _wait(self, predicate: Any, timeout: float, what: str) -> None:
        with self._cv:
            if not self._cv.wait_for(predicate, timeout=timeout):
                raise TimeoutError(f'timed out after {timeout:.0f} s waiting for {what}')

    def wait_sim_time(self, t: float, timeout: float = 30.0) -> None:
        self._wait(lambda: self._js_time >= t, timeout, f'sim time {t:.2f} s on /joint_states')

    def _call(self, client: Any, request: Any, timeout: float = 60.0) -> Any:
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f'service {client.srv_name} is not available')
        if client.srv_name not in self._ready_clients:
            # Discovery matches the request channel first; a request sent before the reply
            # channel has matched loses its answer (Fast DDS), so give it a moment once.
            time.sleep(1.0)
            self._ready_clients.add(client.srv_name)
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout):
            raise TimeoutError(f'service {client.srv_name} did not answer in {timeout:.0f} s')
        return future.result()

    def _publish(self, pub: Any, msg: Any) -> None:
        pub.publish(msg)
        self.sent[pub.topic_name] += 1

    # ----------------------------------------------------------------------------- episode
    def _sync_shadow(self) -> None:
        """Copy the measured arm and finger positions, and the poses of the movable (free)
        objects, into the local scene."""
        env = self._shadow
        with self._cv:
            positions, objects = dict(self._js_positions), dict(self._objects)
        for name in (*self.robot.arm_joint_names, *self.robot.finger_joint_names):
            if name in positions:
                env.data.qpos[env.model.joint(name).qposadr[0]] = positions[name]
        for name, (xyz, wxyz) in objects.items():
            joint = mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_JOINT, name)
            if joint < 0 or env.model.jnt_type[joint] != mujoco.mjtJoint.mjJNT_FREE:
                continue            # fixed in the scene (zones, bowls) or not in it
            adr = env.model.jnt_qposadr[joint]
            env.data.qpos[adr:adr + 3] = xyz
            env.data.qpos[adr + 3:adr + 7] = wxyz
        mujoco.mj_forward(env.model, env.data)

    def _current_q(self) -> np.ndarray:
        with self._cv:
            return np.array([self._js_positions[n] for n in self.robot.arm_joint_names])

    def run_episode(self, seed: int) -> EpisodeOutcome:
        self.sent.clear()
        reply = self._call(self.reset_client, ResetSim.Request(task=self.task, seed=seed))
        if not reply.success:
            raise RuntimeError(f'simulator reset failed: {reply.message}')
        count = self._js_count
        self._wait(lambda: self._js_count >= count + 3, 30.0, 'joint states after the reset')
        # A simulator paced in real time catches up on the wall time its reset took, a burst
        # of messages; start the episode once the stream is steady again.
        self.wait_sim_time(self.sim_time() + self.settle_s)
        if self.task in LIVE_POSE_TASKS:
            after = self.sim_time()
            self._wait(lambda: self._objects_time >= after, 30.0,
                       f'object poses of the new scene on '
                       f'{self.object_poses_topic} (the {self.task} '
                       'expert re-plans from them; is the simulator publishing them?)')
        if self._shadow is None or self._shadow.task_name != self.task:
            self._shadow = make_env(self.task, seed=seed, render=False)
        else:
            self._shadow.reset(seed)
        self._sync_shadow()
        expert = ScriptedExpert(self._shadow, horizon=self.horizon, dt=self.dt)
        instruction = reply.instruction
        episode_id, recorded = '', False
        if self.record:
            start = self._call(self.start_client, StartEpisode.Request(
                instruction=instruction, task=self.task, operator_name=self.operator_name))
            if not start.success:
                raise RuntimeError(f'recorder refused to start: {start.message}')
            episode_id, recorded = start.episode_id, True
        self._publish(self.instruction_pub, String(data=instruction))
        t_start = self.sim_time()
        # An explicit opening command first: every frame of the episode has a gripper target.
        width = self.robot.gripper.max_width
        opening = GripperCommand(width=width, speed=self.robot.gripper.max_speed, force=30.0,
                                 grasp=False)
        opening.header.stamp = self._sim_stamp()
        self._publish(self.gripper_pub, opening)
        while not expert.done and self.sim_time() - t_start < self.max_episode_s:
            self._sync_shadow()
            actions = expert.next_chunk()                       # (horizon, 8)
            t0 = self.sim_time()
            pos, times, vel = chunk_to_trajectory(actions[:, :7], self.dt, self._current_q(),
                                                  self.robot)
            traj = trajectory_msg(self.robot.arm_joint_names, pos, times, vel)
            # Stamped with its start on the simulator's clock (not 0 = "whenever it arrives"),
            # so the setpoint at every instant is defined by the message alone, as the JTC
            # executes it, and the recorded bag says exactly what was commanded when.
            traj.header.stamp = self._sim_stamp()
            self._publish(self.traj_pub, traj)
            chunk = ActionChunk(joint_names=list(self.robot.arm_joint_names),
                                horizon=self.horizon, action_dim=7, dt=self.dt,
                                positions=pos.reshape(-1).tolist(),
                                velocities=vel.reshape(-1).tolist(),
                                gripper=actions[:, 7].astype(float).tolist(),
                                model_id='scripted_expert')
            chunk.header.stamp = self._sim_stamp()
            self._publish(self.chunk_pub, chunk)
            for k in range(self.horizon):
                self.wait_sim_time(t0 + k * self.dt)
                target = float(actions[k, 7])
                if abs(target - width) > 1e-4:
                    msg = GripperCommand(width=target, speed=self.robot.gripper.max_speed,
                                         force=30.0, grasp=target < width)
                    msg.header.stamp = self._sim_stamp()
                    self._publish(self.gripper_pub, msg)
                    width = target
            self.wait_sim_time(t0 + self.horizon * self.dt)
        self.wait_sim_time(self.sim_time() + 0.5)               # let the scene settle
        success = self._success
        duration = self.sim_time() - t_start
        message = ''
        if recorded:
            if self.only_successful and not success:
                from std_srvs.srv import Trigger
                client = self.create_client(Trigger, self.stop_client.srv_name.replace(
                    'stop_episode', 'discard_episode'))
                message = self._call(client, Trigger.Request()).message
                recorded = False
            else:
                stop = self._call(self.stop_client, StopEpisode.Request(
                    success=success, notes=f'scripted expert, seed {seed}'))
                message = stop.message
        return EpisodeOutcome(seed, episode_id, success, duration, recorded, message,
                              dict(self.sent))

    def run(self) -> list[EpisodeOutcome]:
        outcomes = []
        for i in range(self.episodes):
            seed = self.first_seed + i
            outcome = self.run_episode(seed)
            outcomes.append(outcome)
            self.get_logger().info(
                f'episode {i + 1}/{self.episodes} (seed {seed}): '
                f'{"success" if outcome.success else "failure"} in {outcome.sim_duration:.1f} s'
                + (f'; {outcome.message}' if outcome.message else ''))
        return outcomes


class ExpertSession:
    """An ExpertTeleopNode spinning in a background thread: the node's own entry point, and
    commands that run episodes in-process (`iflybot record`, `iflybot demo`) without importing
    rclpy themselves."""

    def __init__(self, context_init: bool = True, args: list[str] | None = None,
                 **params: Any) -> None:
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.parameter import Parameter

        if context_init:
            rclpy.init(args=args)
        try:
            self.node = ExpertTeleopNode(parameter_overrides=[
                Parameter(name, value=value) for name, value in params.items()])
        except ParameterError:
            if context_init:
                rclpy.try_shutdown()
            raise
        self.executor = MultiThreadedExecutor(num_threads=2)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def close(self, shutdown: bool = True) -> None:
        self.executor.shutdown()
        self._thread.join(timeout=5.0)   # a live spin thread at exit aborts the interpreter
        self.node.destroy_node()
        if shutdown:
            rclpy.try_shutdown()


def main(args: list[str] | None = None) -> int:
    from rclpy.executors import ExternalShutdownException

    try:
        session = ExpertSession(args=args)
    except ParameterError:      # the node logged which parameter
        return 1
    node = session.node
    status = 0
    try:
        outcomes = node.run()
        ok = sum(o.success for o in outcomes)
        node.get_logger().info(f'done: {ok}/{len(outcomes)} successful episodes')
        if not node.shutdown_when_done:
            while rclpy.ok():
                time.sleep(0.5)
    except (KeyboardInterrupt, ExternalShutdownException):
        status = 130
    except (RuntimeError, TimeoutError) as err:
        print(f'iflybot_expert_teleop: error: {err}', file=sys.stderr)
        status = 1
    finally:
        session.close()
    return status


def shutdown_ros() -> None:
    rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
