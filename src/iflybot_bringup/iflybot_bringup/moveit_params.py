"""The FR3's MoveIt parameters as plain data (no ROS imports): for Servo and moveit_py nodes.

The URDF and SRDF come from franka_description's xacro files at launch time (launch_builder);
everything else is here. Joint limits come from config/robot/fr3.yaml (RobotSpec), the single
place for them. Facts: MoveIt planning group `fr3_arm` (tip fr3_link8), JointTrajectoryController
`fr3_arm_controller` (franka_fr3_moveit_config).
"""
from __future__ import annotations

from typing import Any

PLANNING_GROUP = 'fr3_arm'
ARM_CONTROLLER = 'fr3_arm_controller'
URDF_XACRO = ('franka_bringup', 'urdf/franka_arm.urdf.xacro')
SRDF_XACRO_DIR = ('franka_description', 'robots')  # robots/<type>/<type>.srdf.xacro


def joint_limits() -> dict[str, Any]:
    """robot_description_planning.joint_limits from RobotSpec (velocity and acceleration)."""
    from iflybot_vla_policy.robot import load_robot

    robot = load_robot()
    return {name: {'has_velocity_limits': True, 'max_velocity': float(robot.dq_max[i]),
                   'has_acceleration_limits': True, 'max_acceleration': float(robot.ddq_max[i])}
            for i, name in enumerate(robot.arm_joint_names)}


def fr3_moveit_parameters() -> dict[str, Any]:
    """Kinematics, limits, OMPL pipeline, controllers and scene monitor settings for the FR3."""
    from iflybot_vla_policy.robot import load_robot

    robot = load_robot()
    return {
        'robot_description_kinematics': {PLANNING_GROUP: {
            'kinematics_solver': 'kdl_kinematics_plugin/KDLKinematicsPlugin',
            'kinematics_solver_search_resolution': 0.005,
            'kinematics_solver_timeout': 0.05,
        }},
        'robot_description_planning': {'joint_limits': joint_limits()},
        # moveit_py (MoveItCpp): one OMPL pipeline and the default request.
        'planning_pipelines': {'pipeline_names': ['ompl']},
        'ompl': {
            'planning_plugins': ['ompl_interface/OMPLPlanner'],
            'request_adapters': [
                'default_planning_request_adapters/ResolveConstraintFrames',
                'default_planning_request_adapters/ValidateWorkspaceBounds',
                'default_planning_request_adapters/CheckStartStateBounds',
                'default_planning_request_adapters/CheckStartStateCollision',
            ],
            'response_adapters': [
                'default_planning_response_adapters/AddTimeOptimalParameterization',
                'default_planning_response_adapters/ValidateSolution',
            ],
            'start_state_max_bounds_error': 0.1,
            PLANNING_GROUP: {'default_planner_config': 'RRTConnectkConfigDefault',
                             'planner_configs': ['RRTConnectkConfigDefault']},
            'planner_configs': {'RRTConnectkConfigDefault': {
                'type': 'geometric::RRTConnect', 'range': 0.0}},
        },
        'plan_request_params': {
            'planning_attempts': 1,
            'planning_pipeline': 'ompl',
            'planner_id': 'RRTConnectkConfigDefault',
            'planning_time': 5.0,
            'max_velocity_scaling_factor': 0.2,
            'max_acceleration_scaling_factor': 0.2,
        },
        'planning_scene_monitor_options': {
            'name': 'planning_scene_monitor',
            'robot_description': 'robot_description',
            'joint_state_topic': '/joint_states',
            'attached_collision_object_topic': '/planning_scene_monitor',
            'publish_planning_scene_topic': '/publish_planning_scene',
            'monitored_planning_scene_topic': '/monitored_planning_scene',
            'wait_for_initial_state_timeout': 10.0,
        },
        # Trajectory execution through franka_ros2's JointTrajectoryController.
        'moveit_manage_controllers': False,
        'moveit_controller_manager':
            'moveit_simple_controller_manager/MoveItSimpleControllerManager',
        'moveit_simple_controller_manager': {
            'controller_names': [ARM_CONTROLLER],
            ARM_CONTROLLER: {'action_ns': 'follow_joint_trajectory',
                             'type': 'FollowJointTrajectory', 'default': True,
                             'joints': list(robot.arm_joint_names)},
        },
        'trajectory_execution': {'allowed_execution_duration_scaling': 1.2,
                                 'allowed_goal_duration_margin': 0.5,
                                 'allowed_start_tolerance': 0.01},
    }
