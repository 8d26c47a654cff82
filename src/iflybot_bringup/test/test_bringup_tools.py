"""Gripper bridge, MoveIt home motion and the RViz configuration."""
from __future__ import annotations

import importlib.util
import math
import subprocess

import pytest
import yaml

from iflybot_bringup import graph as graph_mod
from iflybot_bringup.gripper_bridge import MISSING_FRANKA, gripper_goal
from iflybot_bringup.moveit_home import MISSING_MOVEIT, home_goal
from iflybot_vla_policy.robot import load_robot

HAND = dict(max_width=0.08, max_speed=0.1, max_force=70.0, default_speed=0.05,
            default_force=30.0, epsilon_inner=0.005, epsilon_outer=0.08)


def test_open_command_becomes_a_move_goal_clamped_to_the_hand() -> None:
    goal = gripper_goal(0.2, 0.5, 0.0, False, **HAND)
    assert (goal.action, goal.width, goal.speed) == ('move', 0.08, 0.1)


def test_grasp_command_becomes_a_grasp_goal_with_defaults_for_zero_fields() -> None:
    goal = gripper_goal(-0.01, 0.0, 0.0, True, **HAND)
    assert goal.action == 'grasp'
    assert (goal.width, goal.speed, goal.force) == (0.0, 0.05, 30.0)
    assert (goal.epsilon_inner, goal.epsilon_outer) == (0.005, 0.08)
    assert gripper_goal(0.02, 0.01, 500.0, True, **HAND).force == 70.0


def test_non_finite_gripper_command_is_refused() -> None:
    with pytest.raises(ValueError, match='non-finite'):
        gripper_goal(math.nan, 0.05, 0.0, False, **HAND)


def test_home_goal_is_the_robot_home_and_scaling_is_checked() -> None:
    home, scaling = home_goal(0.3)
    assert home.shape == (7,) and scaling == 0.3
    assert home.tolist() == pytest.approx(list(load_robot().home))
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match='velocity_scaling'):
            home_goal(bad)


@pytest.mark.parametrize('executable, message, module', [
    ('gripper_bridge', MISSING_FRANKA, 'franka_msgs'),
    ('moveit_home', MISSING_MOVEIT, 'moveit')])
def test_tools_outside_docker_exit_with_a_clear_message(
        executable: str, message: str, module: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f'{module} is installed here')
    prefix = graph_mod.package_prefix('iflybot_bringup')
    assert prefix is not None, 'build the workspace (scripts/setup.sh)'
    proc = subprocess.run([str(prefix / 'lib/iflybot_bringup' / executable)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and 'docker' in proc.stderr.lower()


def test_rviz_config_shows_robot_cameras_and_policy_markers() -> None:
    config = yaml.safe_load((graph_mod.bringup_dir() / 'rviz/iflybot.rviz').read_text())
    displays = config['Visualization Manager']['Displays']
    topics = {d['Class']: [] for d in displays}
    for d in displays:
        topic = d.get('Topic') or d.get('Description Topic')
        if topic:
            topics[d['Class']].append(topic['Value'])
    assert topics['rviz_default_plugins/RobotModel'] == ['/robot_description']
    assert sorted(topics['rviz_default_plugins/Image']) == [
        '/scene_camera/color/image_raw', '/wrist_camera/color/image_raw']
    assert topics['rviz_default_plugins/MarkerArray'] == ['/vla/markers']
    assert config['Visualization Manager']['Global Options']['Fixed Frame'] == 'fr3_link0'
