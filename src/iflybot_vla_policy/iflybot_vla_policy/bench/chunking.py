"""Benchmark: smoothness of chunk execution strategies (blend, ensemble, naive) on one rollout.

A synthetic policy follows a smooth joint-space motion but, like a real one, each chunk carries
its own offset (chunks disagree); inference takes `delay` seconds and starts every
`inference_period`. Every strategy sees exactly the same chunks at the same times. We sample the
commanded trajectory (what a JointTrajectoryController executes) at 1 kHz and report jerk,
the largest position/velocity steps and the tracking error against the underlying motion.
"""
from __future__ import annotations

import time

import numpy as np

from iflybot_vla_policy.chunking import ChunkExecutor, ExecutionConfig
from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.safety import SafetyConfig, SafetyFilter

# A pose in front of the robot (TCP ~0.41, 0, 0.57 m) and amplitudes that keep the TCP inside
# the workspace box for every seed.
START = load_robot().home + np.array([0.0, 0.3, 0.0, 0.4, 0.0, 0.0, 0.0])
AMPLITUDE = np.array([0.18, 0.12, 0.18, 0.15, 0.24, 0.18, 0.3])


def synthetic_chunks(duration: float, inference_period: float, delay: float, horizon: int,
                     dt: float, noise: float, seed: int) -> list[tuple[float, float, np.ndarray]]:
    """[(t_obs, t_ready, chunk (horizon, 8))]: a sine motion plus a per-chunk offset."""
    rng = np.random.default_rng(seed)
    rng.uniform(0, 2 * np.pi, 7)   # the phases target_motion draws
    out = []
    for t_obs in np.arange(0.0, duration, inference_period):
        t = t_obs + np.arange(horizon) * dt
        q = target_motion(t, seed)
        # Chunks are smooth inside but disagree with each other: an offset and a drift each.
        q = q + rng.normal(0.0, noise, 7) + rng.normal(0.0, noise, 7) * (t - t_obs)[:, None]
        chunk = np.hstack([q, np.full((horizon, 1), 0.04)])
        out.append((float(t_obs), float(t_obs + delay), chunk))
    return out


def target_motion(t: np.ndarray, seed: int) -> np.ndarray:
    """The motion the synthetic chunks scatter around, (len(t), 7)."""
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 7)
    return START + AMPLITUDE * (np.sin(2 * np.pi * 0.25 * t[:, None] + phase) - np.sin(phase))


def simulate_rollout(strategy: str, duration: float = 4.0, inference_period: float = 0.25,
                     delay: float = 0.15, horizon: int = 30, dt: float = 1.0 / 30.0,
                     noise: float = 0.02, seed: int = 0, sample_dt: float = 1e-3,
                     safety: SafetyFilter | None = None, blend_schedule: str = 'smooth') -> dict:
    """Execute the synthetic chunks with one strategy; returns the sampled command timeline.

    Keys: t (n,), positions (n, 7), velocities (n, 7), holds (reasons), splice_s (mean time to
    splice one chunk, s).
    """
    safety = safety or SafetyFilter(load_robot(), SafetyConfig())
    executor = ChunkExecutor(safety, ExecutionConfig(strategy=strategy,
                                                     blend_schedule=blend_schedule))
    executor.reset(START, 0.0)
    chunks = synthetic_chunks(duration, inference_period, delay, horizon, dt, noise, seed)
    t_grid = np.arange(0.0, duration + delay, sample_dt)
    positions = np.empty((len(t_grid), safety.robot.n_joints))
    velocities = np.empty_like(positions)
    holds: list[str] = []
    splice_time = 0.0
    index = 0
    for t_obs, t_ready, chunk in chunks + [(np.inf, np.inf, None)]:
        while index < len(t_grid) and t_grid[index] < t_ready:
            positions[index], velocities[index] = executor.commanded(t_grid[index])
            index += 1
        if chunk is None:
            break
        p_meas, _ = executor.commanded(t_obs)
        check = safety.check_chunk(chunk, dt, p_meas)
        if not check.ok:
            executor.hold(t_ready)
            holds.append(check.hold_reason)
            continue
        values = np.hstack([check.positions, check.gripper[:, None]])
        start = time.perf_counter()
        _, reason = executor.splice(values, dt, t_obs, t_ready)
        splice_time += time.perf_counter() - start
        if reason:
            holds.append(reason)
    return {'t': t_grid[:index], 'positions': positions[:index],
            'velocities': velocities[:index], 'holds': holds,
            'splice_s': splice_time / max(1, len(chunks))}


def smoothness(rollout: dict, skip: float = 0.0) -> dict:
    """Jerk RMS / p99, and the largest per-sample position and velocity steps, ignoring the
    first `skip` seconds (the start from rest is the same for every strategy)."""
    keep = rollout['t'] >= skip
    t, p, v = rollout['t'][keep], rollout['positions'][keep], rollout['velocities'][keep]
    h = float(t[1] - t[0])
    acc = np.diff(v, axis=0) / h
    jerk = np.diff(acc, axis=0) / h
    return {'jerk_rms': float(np.sqrt(np.mean(jerk ** 2))),
            'jerk_p99': float(np.percentile(np.abs(jerk), 99)),
            'max_abs_acc': float(np.abs(acc).max()),
            'max_position_step': np.abs(np.diff(p, axis=0)).max(axis=0),   # (7,)
            'max_velocity_step': np.abs(np.diff(v, axis=0)).max(axis=0)}   # (7,)


def run(quick: bool = False) -> dict:
    """Jerk of blend vs ensemble vs naive on the same synthetic rollout (same chunks, same
    times). 'blend_exp' is the blend with the paper's exponential soft mask instead of the
    smooth default. (rtc in the denoiser needs a model: the `rtc` benchmark.)
    """
    duration = 6.0 if quick else 30.0
    seeds = [0] if quick else [0, 1, 2]
    results: dict = {'duration_s': duration, 'seeds': seeds, 'metric':
                     'RMS jerk of the commanded trajectory sampled at 1 kHz, after 1 s'}
    variants = {'blend': ('blend', 'smooth'), 'blend_exp': ('blend', 'exp'),
                'ensemble': ('ensemble', 'smooth'), 'naive': ('naive', 'smooth')}
    for name, (strategy, schedule) in variants.items():
        jerk, err, splice, holds = [], [], [], 0
        for seed in seeds:
            rollout = simulate_rollout(strategy, duration=duration, seed=seed,
                                       blend_schedule=schedule)
            m = smoothness(rollout, skip=1.0)
            jerk.append(m['jerk_rms'])
            err.append(float(np.sqrt(np.mean(
                (rollout['positions'] - target_motion(rollout['t'], seed)) ** 2))))
            splice.append(rollout['splice_s'])
            holds += len(rollout['holds'])
        results[name] = {'jerk_rms_rad_s3': float(np.mean(jerk)),
                         'tracking_rms_rad': float(np.mean(err)),
                         'splice_ms': 1e3 * float(np.mean(splice)), 'holds': holds}
    base = results['naive']['jerk_rms_rad_s3']
    for name in variants:
        results[name]['jerk_vs_naive'] = results[name]['jerk_rms_rad_s3'] / base
    return results


if __name__ == '__main__':
    import json
    print(json.dumps(run(quick=True), indent=2))
