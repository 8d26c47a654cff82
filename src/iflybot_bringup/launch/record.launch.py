"""Demonstrations (simulator or FR3, teleop, recorder): graphs/record.yaml.

Arguments: `ros2 launch iflybot_bringup record.launch.py --show-args`; the same graph runs without
ros2 launch as `iflybot up record`.
"""
from iflybot_bringup.launch_builder import generate_from_graph


def generate_launch_description():
    return generate_from_graph('record')
