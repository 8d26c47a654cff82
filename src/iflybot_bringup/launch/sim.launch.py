"""MuJoCo FR3 simulation driven by the VLA policy: graphs/sim.yaml.

Arguments: `ros2 launch iflybot_bringup sim.launch.py --show-args`; the same graph runs without
ros2 launch as `iflybot up sim`.
"""
from iflybot_bringup.launch_builder import generate_from_graph


def generate_launch_description():
    return generate_from_graph('sim')
