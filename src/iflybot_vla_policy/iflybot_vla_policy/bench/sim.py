"""Benchmark: simulator physics rate, camera render time and real-time factor with cameras.

Baselines measured in the same run:
- physics: the bare `mj_step` of the same model (no controller) is the ceiling; the env step adds
  the JTC spline, the computed-torque law and the gripper servo in Python;
- rendering and real-time factor: MuJoCo's default visuals (4x MSAA, shadow map, shadow-casting
  light) against ours (no MSAA, no shadows, no reflections, no skybox).
"""
from __future__ import annotations

import time

import numpy as np


def _physics(quick: bool) -> dict:
    import mujoco

    from iflybot_vla_policy.sim import make_env

    steps = 1000 if quick else 5000
    env = make_env('pick_place', seed=0, render=False)
    goal = env.joint_positions[:7] + 0.2
    env.command_joint_trajectory([goal], [steps * 0.002], velocities=[np.zeros(7)])
    start = time.perf_counter()
    env.step(steps)
    controlled = steps / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):
        mujoco.mj_step(env.model, env.data)
    bare = steps / (time.perf_counter() - start)
    return {'physics_steps_per_s': controlled, 'physics_bare_mj_step_per_s': bare,
            'physics_sim_s_per_wall_s': controlled * 0.002,
            'physics_controller_overhead': bare / controlled}


def _render_ms(size: tuple[int, int], fast: bool, frames: int) -> float:
    from iflybot_vla_policy.sim import make_env

    with make_env('pick_place', seed=0, image_size=size, fast_visuals=fast) as env:
        env.render(['scene_camera'])          # GL context and upload, not timed
        start = time.perf_counter()
        for _ in range(frames):
            env.render(['scene_camera'])
        return (time.perf_counter() - start) / frames * 1e3


def _real_time_factor(size: tuple[int, int], fast: bool, sim_seconds: float,
                      camera_rate: float = 15.0) -> float:
    """Sim seconds per wall second: physics + both cameras at camera_rate (sim Hz)."""
    from iflybot_vla_policy.sim import make_env

    with make_env('pick_place', seed=0, image_size=size, fast_visuals=fast) as env:
        env.render()
        goal = env.joint_positions[:7] + 0.2
        env.command_joint_trajectory([goal], [sim_seconds], velocities=[np.zeros(7)])
        frames = max(1, round(sim_seconds * camera_rate))
        start = time.perf_counter()
        for _ in range(frames):
            env.step(1.0 / camera_rate)
            env.render()
        return frames / camera_rate / (time.perf_counter() - start)


def run(quick: bool = True) -> dict:
    results: dict[str, float | str] = {}
    results.update(_physics(quick))
    fast_frames, slow_frames = (10, 2) if quick else (50, 5)
    for height, width in ((224, 224), (480, 640)):
        key = f'{width}x{height}'
        results[f'render_ms_{key}'] = _render_ms((height, width), True, fast_frames)
        results[f'render_ms_{key}_default_visuals'] = _render_ms((height, width), False,
                                                                 slow_frames)
    sim_seconds = 1.0 if quick else 4.0
    for height, width in ((240, 320), (480, 640)):
        key = f'{width}x{height}'
        results[f'rtf_2cams_15hz_{key}'] = _real_time_factor((height, width), True, sim_seconds)
    results['rtf_2cams_15hz_320x240_default_visuals'] = _real_time_factor(
        (240, 320), False, 0.2 if quick else 1.0)
    from iflybot_vla_policy.sim import GL_BACKEND
    results['gl_backend'] = GL_BACKEND
    return results


if __name__ == '__main__':
    import json
    import sys

    print(json.dumps(run(quick='--full' not in sys.argv), indent=2))
