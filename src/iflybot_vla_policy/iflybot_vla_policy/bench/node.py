"""Benchmark of the policy node over real DDS (`tiny`, random weights, CPU).

The measurements start ROS nodes, so they live in `ros/node_bench.py`; this module only hands
them to `iflybot bench`, keeping the core free of rclpy imports.
"""
from __future__ import annotations


def run(quick: bool = False) -> dict:
    from iflybot_vla_policy.ros.node_bench import run as run_node_bench

    return run_node_bench(quick)


if __name__ == '__main__':
    import json
    import sys

    print(json.dumps(run(quick='--full' not in sys.argv), indent=2))
