"""Move the FR3 to its home pose with MoveIt (moveit_py): a collision-free reset between episodes.

The policy's own commands are small steps from where the arm is; bringing it back from wherever
an episode ended needs a planner. moveit_py exists only on a full ROS 2 install with MoveIt
(docker/): it is imported inside main(), which exits with a clear message when it is missing.
Started by `ros2 launch iflybot_bringup home.launch.py`, which passes the FR3's URDF, SRDF and
MoveIt parameters (moveit_params.py). Exit status 0 when the arm reached home.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from iflybot_bringup.moveit_params import ARM_CONTROLLER, PLANNING_GROUP

NODE_NAME = 'iflybot_moveit_home'
MISSING_MOVEIT = ('moveit_home needs moveit_py (MoveIt 2), which is not installed here. Run it on '
                  'a full ROS 2 install: in the Docker image (docker/README.md), beside a running '
                  '`ros2 launch iflybot_bringup franka.launch.py`, start '
                  '`ros2 launch iflybot_bringup home.launch.py`.')


def home_goal(velocity_scaling: float) -> tuple[np.ndarray, float]:
    """The home joint positions (7,) of config/robot/fr3.yaml and a checked velocity scaling."""
    from iflybot_vla_policy.robot import load_robot

    if not math.isfinite(velocity_scaling) or not 0.0 < velocity_scaling <= 1.0:
        raise ValueError(f'velocity_scaling must be in (0, 1], got {velocity_scaling}')
    robot = load_robot()
    home = np.asarray(robot.home, dtype=np.float64)
    if np.any(home < robot.q_min) or np.any(home > robot.q_max):
        raise ValueError('the home pose of config/robot/fr3.yaml is outside the joint limits')
    return home, float(velocity_scaling)


def _velocity_scaling_parameter(argv: list[str]) -> float:
    """Our parameter from the launch file's --params-file, read with a short-lived rclpy node."""
    import rclpy

    context = rclpy.Context()
    rclpy.init(args=argv, context=context)
    try:
        node = rclpy.create_node(NODE_NAME, context=context)
        value = float(node.declare_parameter('velocity_scaling', 0.2).value)
        node.destroy_node()
        return value
    finally:
        rclpy.shutdown(context=context)


def main(argv: list[str] | None = None) -> int:
    try:
        from moveit.core.robot_state import RobotState
        from moveit.planning import MoveItPy, PlanRequestParameters
    except ImportError:
        print(MISSING_MOVEIT, file=sys.stderr)
        return 2
    argv = list(sys.argv if argv is None else argv)
    try:
        home, scaling = home_goal(_velocity_scaling_parameter(argv))
    except ValueError as exc:
        print(f'moveit_home: {exc}', file=sys.stderr)
        return 2
    robot = MoveItPy(node_name=NODE_NAME)   # reads the launch file's --params-file arguments
    try:
        arm = robot.get_planning_component(PLANNING_GROUP)
        goal = RobotState(robot.get_robot_model())
        goal.set_joint_group_positions(PLANNING_GROUP, home)
        arm.set_start_state_to_current_state()
        arm.set_goal_state(robot_state=goal)
        params = PlanRequestParameters(robot, 'plan_request_params')
        params.max_velocity_scaling_factor = scaling
        params.max_acceleration_scaling_factor = scaling
        plan = arm.plan(single_plan_parameters=params)
        if not plan:
            print('moveit_home: no plan to the home pose (start state in collision or outside '
                  'the limits?)', file=sys.stderr)
            return 1
        status = robot.execute(plan.trajectory, controllers=[ARM_CONTROLLER])
        if not status:   # ExecutionStatus is truthy on SUCCEEDED
            print(f'moveit_home: execution ended with {status.status}', file=sys.stderr)
            return 1
        print(f'moveit_home: reached home {np.round(home, 3).tolist()}')
        return 0
    finally:
        robot.shutdown()


if __name__ == '__main__':
    sys.exit(main())
