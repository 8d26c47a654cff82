"""GripperCommand (`gripper_topic`) -> franka_gripper's `~/move` and `~/grasp` actions.

The policy and the teleops speak one gripper message; the simulator consumes it directly, the
real Franka Hand needs franka_gripper's actions (franka_msgs/action/Move, Grasp). franka_msgs
exists only on a full ROS 2 install with franka_ros2 (docker/): it is imported inside main(),
which exits with a clear message when it is missing. A newer command preempts the running goal.
Parameters: `SCHEMA` (a bad value fails the start naming it; docs/parameters.md).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from iflybot_vla_policy.params import Param, Schema

NODE_NAME = 'iflybot_gripper_bridge'
MISSING_FRANKA = ('gripper_bridge needs franka_msgs (franka_ros2), which is not installed here. '
                  'Run it on a full ROS 2 install: the Docker image (docker/README.md) has it, '
                  'and `ros2 launch iflybot_bringup franka.launch.py` starts this bridge.')

SCHEMA = Schema(NODE_NAME, (
    Param('gripper_action_ns', 'franka_gripper',
          "namespace of franka_gripper's move and grasp actions"),
    Param('gripper_topic', '/vla/gripper_command', 'iflybot_vla_msgs/GripperCommand to follow'),
    Param('default_speed', 0.05, 'finger speed of a command whose speed is 0, m/s', gt=0.0),
    Param('default_force', 30.0, 'grasp force of a command whose force is 0, N', gt=0.0),
    Param('epsilon_inner', 0.005,
          'm: a grasp succeeds if the object is up to this much narrower than the width',
          ge=0.0),
    Param('epsilon_outer', 0.08,
          'm: a grasp succeeds if the object is up to this much wider than the width', ge=0.0),
))


@dataclass(frozen=True)
class GripperGoal:
    """One franka_gripper goal: `move` to a width, or `grasp` with a force."""

    action: str          # 'move' | 'grasp'
    width: float         # m, opening between the fingers
    speed: float         # m/s
    force: float = 0.0   # N (grasp only)
    epsilon_inner: float = 0.0   # m: grasp succeeds if the object is this much narrower ...
    epsilon_outer: float = 0.0   # ... or this much wider than `width`


def gripper_goal(width: float, speed: float, force: float, grasp: bool, *, max_width: float,
                 max_speed: float, max_force: float, default_speed: float,
                 default_force: float, epsilon_inner: float, epsilon_outer: float
                 ) -> GripperGoal:
    """The goal for one GripperCommand, clamped to the hand's limits (config/robot/fr3.yaml).

    A zero or negative speed/force in the message means "the default" (messages default to 0).
    """
    if not all(map(_finite, (width, speed, force))):
        raise ValueError(f'non-finite gripper command: width={width}, speed={speed}, '
                         f'force={force}')
    width = min(max(width, 0.0), max_width)
    speed = min(speed if speed > 0.0 else default_speed, max_speed)
    if not grasp:
        return GripperGoal('move', width, speed)
    force = min(force if force > 0.0 else default_force, max_force)
    return GripperGoal('grasp', width, speed, force, epsilon_inner, epsilon_outer)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float('inf')


def _fill_goal(goal_msg: Any, goal: GripperGoal) -> Any:
    goal_msg.width = goal.width
    goal_msg.speed = goal.speed
    if goal.action == 'grasp':
        goal_msg.force = goal.force
        goal_msg.epsilon.inner = goal.epsilon_inner
        goal_msg.epsilon.outer = goal.epsilon_outer
    return goal_msg


def main(argv: list[str] | None = None) -> int:
    try:
        from franka_msgs.action import Grasp, Move
    except ImportError:
        print(MISSING_FRANKA, file=sys.stderr)
        return 2
    import rclpy
    from iflybot_vla_msgs.msg import GripperCommand
    from rclpy.action import ActionClient
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node

    from iflybot_vla_policy.robot import load_robot
    from iflybot_vla_policy.ros.parameters import ParameterError, load_parameters

    hand = load_robot().gripper

    class GripperBridge(Node):
        def __init__(self) -> None:
            super().__init__(NODE_NAME)
            p = load_parameters(self, SCHEMA)
            ns = p['gripper_action_ns']
            self._defaults = {k: p[k] for k in ('default_speed', 'default_force',
                                                'epsilon_inner', 'epsilon_outer')}
            self._clients = {'move': (ActionClient(self, Move, f'{ns}/move'), Move),
                             'grasp': (ActionClient(self, Grasp, f'{ns}/grasp'), Grasp)}
            self._active: Any = None
            self.create_subscription(GripperCommand, p['gripper_topic'], self._on_cmd, 10)
            self.get_logger().info(f"bridging {p['gripper_topic']} to {ns}/move and {ns}/grasp")

        def _on_cmd(self, msg: GripperCommand) -> None:
            try:
                goal = gripper_goal(msg.width, msg.speed, msg.force, msg.grasp,
                                    max_width=hand.max_width, max_speed=hand.max_speed,
                                    max_force=hand.max_force, **self._defaults)
            except ValueError as exc:
                self.get_logger().error(f'ignored: {exc}')
                return
            client, action_type = self._clients[goal.action]
            if not client.server_is_ready():
                self.get_logger().error(f'franka_gripper {goal.action} action server is not '
                                        f'available: command dropped')
                return
            if self._active is not None:
                self._active.cancel_goal_async()
            future = client.send_goal_async(_fill_goal(action_type.Goal(), goal))
            future.add_done_callback(lambda f, g=goal: self._on_accepted(f, g))

        def _on_accepted(self, future: Any, goal: GripperGoal) -> None:
            handle = future.result()
            if not handle.accepted:
                self.get_logger().warning(f'{goal.action} to {goal.width:.3f} m rejected')
                return
            self._active = handle
            handle.get_result_async().add_done_callback(
                lambda f, g=goal: self._on_result(f, g))

        def _on_result(self, future: Any, goal: GripperGoal) -> None:
            result = future.result().result
            ok = getattr(result, 'success', False)
            log = self.get_logger().info if ok else self.get_logger().warning
            log(f'{goal.action} to {goal.width:.3f} m: '
                f'{"done" if ok else "failed " + getattr(result, "error", "")}')

    rclpy.init(args=argv)
    try:
        node = GripperBridge()
    except ParameterError:      # the node logged which parameter
        rclpy.try_shutdown()
        return 1
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
