"""Soak of the sim graph with the bundled policy: back-to-back goals for --duration seconds.

The run starts ROS nodes, so it lives in `ros/soak_bench.py`; this module hands it to
`iflybot bench` (`iflybot bench --only soak --duration 1800`). The quick bench skips it.
"""
from __future__ import annotations


def run(quick: bool = False, duration: float | None = None) -> dict:
    from iflybot_vla_policy.ros.soak_bench import run as run_soak

    return run_soak(quick, duration)
