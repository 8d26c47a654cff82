"""The real FR3 (franka_ros2 + MoveIt Servo) driven by the VLA policy: graphs/franka.yaml.

Arguments: `ros2 launch iflybot_bringup franka.launch.py --show-args`; the same graph runs without
ros2 launch as `iflybot up franka`.
"""
from iflybot_bringup.launch_builder import generate_from_graph


def generate_launch_description():
    return generate_from_graph('franka')
