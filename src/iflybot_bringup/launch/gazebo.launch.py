"""The FR3 in Gazebo (franka_gazebo_bringup) driven by the VLA policy: graphs/gazebo.yaml.

Arguments: `ros2 launch iflybot_bringup gazebo.launch.py --show-args`; the same graph runs without
ros2 launch as `iflybot up gazebo`.
"""
from iflybot_bringup.launch_builder import generate_from_graph


def generate_launch_description():
    return generate_from_graph('gazebo')
