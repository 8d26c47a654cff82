"""One MoveIt motion of the FR3 to its home pose: graphs/home.yaml.

Arguments: `ros2 launch iflybot_bringup home.launch.py --show-args`; the same graph runs without
ros2 launch as `iflybot up home`.
"""
from iflybot_bringup.launch_builder import generate_from_graph


def generate_launch_description():
    return generate_from_graph('home')
