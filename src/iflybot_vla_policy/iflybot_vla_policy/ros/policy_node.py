"""`iflybot_policy`: lifecycle node that runs the VLA at control rate and moves the arm safely.

configure: validate parameters (a bad one fails the transition naming it), load the checkpoint
(or build `preset` with random weights) or connect to a policy server, warm up.
activate: control starts; deactivate: hold position. The logic (run/hold supervisor, input
freshness, chunk requests, the inference worker, safety and splicing, statistics) is the core's
`runtime.PolicyRuntime`; this module declares parameters, converts messages and wires topics,
timers, the run_policy action and the e-stop service to it.
Parameters: `runtime.config.SCHEMA` (docs/parameters.md; topics are parameters).
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import TwistStamped
from iflybot_vla_msgs.action import RunPolicy
from iflybot_vla_msgs.msg import ActionChunk, GripperCommand, PolicyStatus
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

from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.ros.conversions import (
    action_chunk_msg,
    gripper_command_msg,
    image_to_rgb,
    joint_positions,
    path_markers,
    trajectory_msg,
    twist_msg,
)
from iflybot_vla_policy.ros.parameters import (
    declare_parameters,
    read_parameters,
    unknown_parameters,
)
from iflybot_vla_policy.ros.servo_switch import ServoTwistSwitch
from iflybot_vla_policy.runtime import PolicyRuntime, RunState
from iflybot_vla_policy.runtime.config import SCHEMA, NodeConfig, parse_config
from iflybot_vla_policy.runtime.freshness import JOINT_STATES
from iflybot_vla_policy.runtime.loading import load_policy
from iflybot_vla_policy.runtime.stats import RuntimeStats
from iflybot_vla_policy.safety import Trajectory

__all__ = ['SCHEMA', 'NodeConfig', 'PolicyNode', 'main', 'parse_config']

DIAGNOSTIC_LEVELS = {RunState.IDLE: DiagnosticStatus.OK, RunState.RUNNING: DiagnosticStatus.OK,
                     RunState.HOLD: DiagnosticStatus.WARN, RunState.ERROR: DiagnosticStatus.ERROR}


def stamp_seconds(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def to_time(seconds: float) -> Time:
    nanos = int(round(seconds * 1e9))
    return Time(sec=nanos // 1_000_000_000, nanosec=nanos % 1_000_000_000)


class _Publishers:
    """The runtime's `Outputs` as ROS publishers (called with the runtime's lock held)."""

    def __init__(self, node: PolicyNode, cfg: NodeConfig, model_id: str) -> None:
        self.node, self.cfg, self.model_id = node, cfg, model_id
        pub = node.create_publisher
        self.trajectory_pub = pub(JointTrajectory, cfg.trajectory_topic, 10)
        self.twist_pub = pub(TwistStamped, cfg.twist_topic, 10)
        self.gripper_pub = pub(GripperCommand, cfg.gripper_topic, 10)
        self.chunk_pub = pub(ActionChunk, cfg.chunk_topic, 10)
        self.marker_pub = pub(MarkerArray, cfg.markers_topic, 10)
        self.handles = [self.trajectory_pub, self.twist_pub, self.gripper_pub, self.chunk_pub,
                        self.marker_pub]
        # MoveIt Servo ignores twists until switched to TWIST (it starts in JOINT_JOG)
        self.servo_switch = (ServoTwistSwitch(node, cfg.servo_switch_service)
                             if cfg.action_mode == 'ee_delta' and cfg.servo_switch_service
                             else None)
        if self.servo_switch is not None:
            self.handles.append(self.servo_switch.client)

    def trajectory(self, trajectory: Trajectory) -> None:
        """Stamp zero (the controller starts on receipt) or, with stamp_trajectories, the
        node-clock time of the trajectory's start, which removes the transport delay."""
        now = self.node.get_clock().now()
        stamp = None
        if self.cfg.stamp_trajectories:
            offset = trajectory.start - self.node.now_s()
            stamp = (now + Duration(nanoseconds=int(offset * 1e9))).to_msg()
        self.trajectory_pub.publish(trajectory_msg(trajectory, self.cfg.arm_joint_names, stamp))
        self.marker_pub.publish(path_markers(self.node.robot, trajectory.positions,
                                             now.to_msg()))

    def twist(self, twist: np.ndarray) -> None:
        if self.servo_switch is not None and np.any(twist):
            self.servo_switch.ensure()   # no blocking: asks once, polls the answer
        self.twist_pub.publish(twist_msg(twist, self.node.get_clock().now().to_msg(),
                                         self.cfg.twist_frame))

    def gripper(self, width: float, grasp: bool) -> None:
        self.gripper_pub.publish(gripper_command_msg(
            width, self.cfg.gripper_speed, self.cfg.gripper_force, grasp,
            self.node.get_clock().now().to_msg()))

    def chunk(self, values: np.ndarray, dt: float, names: Sequence[str], obs_stamp: float,
              latency_ms: float) -> None:
        self.chunk_pub.publish(action_chunk_msg(values, dt, names, to_time(obs_stamp),
                                                self.model_id, latency_ms))


class PolicyNode(LifecycleNode):
    """See the module docstring. `policy_factory(config) -> object with infer(obs)` replaces
    model loading (tests inject wrappers through it). `runtime` exists while configured."""

    def __init__(self, policy_factory: Callable[[NodeConfig], Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__('iflybot_policy', **kwargs)
        self._policy_factory = policy_factory
        self.robot = load_robot()
        # Validated on configure: a bad value fails it naming the parameter and can be fixed
        # with `ros2 param set` (checked against SCHEMA) before configuring again.
        declare_parameters(self, SCHEMA)
        self.config: NodeConfig | None = None
        self.configure_error = ''
        self.runtime: PolicyRuntime | None = None
        self.stats = RuntimeStats()   # since the node started, across configures
        self._handles: list[Any] = []
        self._tick_waiters: list[Future] = []   # running goals, woken by each control tick
        self._waiters_lock = threading.Lock()
        self.action_server: ActionServer | None = None

    def now_s(self) -> float:
        """Seconds on the clock the controller runs on: the simulator's with use_sim_time (a
        slow simulator slows everything together, freshness included), else monotonic."""
        clock = self.get_clock()
        if clock.ros_time_is_active:
            return clock.now().nanoseconds * 1e-9
        return time.monotonic()

    def _log(self, level: str, text: str) -> None:
        logger = self.get_logger()   # rclpy wants one severity per call site
        if level == 'error':
            logger.error(text)
        elif level == 'warning':
            logger.warning(text)
        else:
            logger.info(text)

    # ------------------------------------------------------------------------ lifecycle
    def unknown_parameters(self) -> list[str]:
        """Params-file keys that are no parameter of this node, with the closest known name."""
        return unknown_parameters(self, SCHEMA)

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        for problem in self.unknown_parameters():
            self.get_logger().warning(problem)
        try:
            cfg = parse_config(read_parameters(self, SCHEMA), self.robot)
        except ValueError as exc:
            return self._fail_configure(str(exc))
        try:
            loaded = load_policy(cfg, self.robot, self._policy_factory,
                                 warn=self.get_logger().warning)
        except Exception as exc:  # noqa: BLE001 - any loading failure fails configure
            name = 'server_uri' if cfg.inference_backend == 'remote' else (
                'checkpoint' if cfg.checkpoint else 'preset')
            return self._fail_configure(f'parameter {name}: cannot load the policy: '
                                        f'{type(exc).__name__}: {exc}')
        self.config = cfg
        outputs = _Publishers(self, cfg, loaded.model_id)
        self.runtime = PolicyRuntime(
            cfg, self.robot, loaded, outputs, clock=self.now_s,
            stamp_clock=lambda: self.get_clock().now().nanoseconds * 1e-9, log=self._log,
            decode_image=image_to_rgb, stats=self.stats)
        self._handles += outputs.handles
        self._create_interfaces(cfg)
        self.configure_error = ''
        self.get_logger().info(f'configured: {loaded.model_id}, {cfg.action_mode} mode, '
                               f'{cfg.execution_strategy}, {cfg.inference_backend} inference')
        return TransitionCallbackReturn.SUCCESS

    def _fail_configure(self, message: str) -> TransitionCallbackReturn:
        self.configure_error = message
        self.get_logger().error(f'configure failed: {message}')
        return TransitionCallbackReturn.FAILURE

    def _create_interfaces(self, cfg: NodeConfig) -> None:
        sensors = ReentrantCallbackGroup()
        calls = ReentrantCallbackGroup()
        runtime, h = self.runtime, self._handles
        self.status_pub = self.create_publisher(PolicyStatus, cfg.status_topic, 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, cfg.diagnostics_topic, 10)
        h += [self.status_pub, self.diag_pub]
        for name, topic in zip(cfg.camera_names, cfg.camera_topics, strict=True):
            h.append(self.create_subscription(
                Image, topic,
                lambda msg, n=name: runtime.on_image(n, msg, stamp_seconds(msg.header.stamp)),
                qos_profile_sensor_data, callback_group=sensors))
        h.append(self.create_subscription(JointState, cfg.joint_state_topic,
                                          self._on_joint_state, qos_profile_sensor_data,
                                          callback_group=sensors))
        h.append(self.create_subscription(String, cfg.instruction_topic, self._on_instruction,
                                          10, callback_group=sensors))
        h.append(self.create_subscription(Bool, cfg.task_success_topic,
                                          lambda msg: runtime.on_task_success(msg.data), 10,
                                          callback_group=sensors))
        h.append(self.create_timer(1.0 / cfg.control_rate_hz, self._on_control_tick,
                                   callback_group=MutuallyExclusiveCallbackGroup()))
        h.append(self.create_timer(1.0 / cfg.status_rate_hz, self._publish_status,
                                   callback_group=calls))
        h.append(self.create_timer(1.0, self._publish_diagnostics, callback_group=calls))
        h.append(self.create_service(Trigger, '~/estop', self._on_estop, callback_group=calls))
        self.action_server = ActionServer(
            self, RunPolicy, '~/run_policy', execute_callback=self._execute_goal,
            goal_callback=self._on_goal, cancel_callback=lambda _goal: CancelResponse.ACCEPT,
            callback_group=calls)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.runtime.activate()
        self.get_logger().info('active')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.runtime.deactivate()
        self.get_logger().info('deactivated: holding position')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.runtime is not None:
            self.runtime.shutdown(reason='shutdown')
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self) -> None:
        runtime, self.runtime = self.runtime, None
        self._wake_goals()   # a goal still running sees the runtime gone and ends
        if runtime is not None:
            runtime.close()
        if self.action_server is not None:
            self.action_server.destroy()
            self.action_server = None
        destroy = {'Publisher': self.destroy_publisher, 'Subscription': self.destroy_subscription,
                   'Timer': self.destroy_timer, 'Service': self.destroy_service,
                   'Client': self.destroy_client}
        for handle in self._handles:
            destroy[type(handle).__name__](handle)
        self._handles.clear()
        self.config = None

    def shutdown(self) -> None:
        """Process exit: brake while the middleware is up (Ctrl-C shuts rclpy's context down
        first; the controller then holds the last trajectory's end on its own), stop the
        worker."""
        if self.runtime is not None:
            self.runtime.shutdown(brake=self.context.ok())

    # ------------------------------------------------------------------------ callbacks
    def _on_joint_state(self, msg: JointState) -> None:
        cfg, runtime = self.config, self.runtime
        if runtime is None:
            return
        try:
            q = joint_positions(msg, cfg.arm_joint_names)
            fingers = joint_positions(msg, cfg.finger_joint_names)
        except (KeyError, ValueError) as exc:
            self.get_logger().warning(f'ignoring joint state: {exc}',
                                      throttle_duration_sec=5.0)
            runtime.on_refused_input(JOINT_STATES, str(exc))
            return
        runtime.on_joint_state(q, float(fingers.sum()), stamp_seconds(msg.header.stamp))

    def _on_instruction(self, msg: String) -> None:
        runtime = self.runtime
        refusal = runtime.refusal(msg.data) if runtime is not None else 'not configured'
        if refusal:
            self.get_logger().error(f'instruction refused: {refusal}',
                                    throttle_duration_sec=2.0)
            return
        runtime.instruct(msg.data)

    def _on_control_tick(self) -> None:
        self._wake_goals()
        runtime = self.runtime
        if runtime is not None:
            runtime.tick()

    def _wake_goals(self) -> None:
        """Resume the running goals' coroutines: they re-check their end conditions once per
        control tick without holding an executor thread."""
        with self._waiters_lock:
            waiters, self._tick_waiters = self._tick_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _next_tick(self) -> Future:
        future = Future()
        with self._waiters_lock:
            self._tick_waiters.append(future)
        return future

    def _on_estop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        was_active = self.runtime is not None and self.runtime.estop()
        if was_active:
            self.trigger_deactivate()
        self.get_logger().warning('e-stop: holding and deactivated')
        response.success = True
        response.message = 'holding; node deactivated' if was_active else 'holding (inactive)'
        return response

    def _on_goal(self, goal: RunPolicy.Goal) -> GoalResponse:
        refusal = 'node is not active' if self.runtime is None else \
            self.runtime.goal_refusal(goal.instruction)
        if refusal:
            self.get_logger().warning(f'run_policy rejected: {refusal}')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    async def _execute_goal(self, goal_handle: Any) -> RunPolicy.Result:
        request, runtime = goal_handle.request, self.runtime
        result = RunPolicy.Result()
        if runtime is None:   # cleaned up between acceptance and execution
            goal_handle.abort()
            result.reason = 'deactivated'
            return result
        goal = runtime.start_goal(request.instruction, stamp_seconds(request.inputs_after),
                                  request.max_duration)
        last_feedback = -np.inf
        while True:
            update = runtime.goal_update(goal, goal_handle.is_cancel_requested)
            if update.reason:
                result.reason, result.success = update.reason, update.success
                if update.reason == 'canceled':
                    goal_handle.canceled()
                elif update.success:
                    goal_handle.succeed()
                else:
                    goal_handle.abort()
                break
            if update.elapsed - last_feedback >= 0.5:
                last_feedback = update.elapsed
                goal_handle.publish_feedback(RunPolicy.Feedback(
                    elapsed=update.elapsed, chunks=update.chunks, state=int(update.state)))
            await self._next_tick()
            if self.runtime is not runtime:   # torn down: nobody to report to
                return result
        result.duration = self.now_s() - goal.start
        return result

    # ------------------------------------------------------------------------ monitoring
    def status(self) -> PolicyStatus:
        runtime = self.runtime
        msg = PolicyStatus() if runtime is None else PolicyStatus(**asdict(runtime.status()))
        msg.header.stamp = self.get_clock().now().to_msg()
        return msg

    def _publish_status(self) -> None:
        if self.runtime is not None:
            self.status_pub.publish(self.status())

    def _publish_diagnostics(self) -> None:
        runtime = self.runtime
        if runtime is None:
            return
        status = runtime.status()
        state = RunState(status.state)
        diag = DiagnosticStatus(level=DIAGNOSTIC_LEVELS[state], name='iflybot_policy',
                                hardware_id='fr3', message=status.last_error or state.name,
                                values=[KeyValue(key=k, value=v)
                                        for k, v in runtime.diagnostics(status).items()])
        array = DiagnosticArray(status=[diag])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(array)


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
