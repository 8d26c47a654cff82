"""Closed-loop evaluation through ROS (`iflybot eval --through-ros`).

The policy runs as the real `iflybot_policy` lifecycle node against the `iflybot_sim` node, both
started by `iflybot up sim`: the same processes, topics, safety layer and chunk execution as on
the robot. Each episode is a `~/reset` of the simulator and a `~/run_policy` goal; metrics come
from what crossed DDS (joint states, trajectories, action chunks).
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from iflybot_vla_policy.eval.metrics import jitter, limit_violations, rms_jerk
from iflybot_vla_policy.eval.report import EpisodeResult, hold_category


def start_graph(graph: str, overrides: Sequence[str], log_path: Path) -> subprocess.Popen:
    """`iflybot up GRAPH ...` as a child process in its own session, logging to `log_path`."""
    log = log_path.open('w')
    return subprocess.Popen([sys.executable, '-m', 'iflybot_vla_policy.cli', 'up', graph,
                             *overrides], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_graph(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """What Ctrl-C does (nodes finalise their bags); SIGKILL the group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()
    return proc.returncode


def run_episodes(jobs: Sequence[tuple[str, int]], graph_overrides: Sequence[str],
                 out_dir: Path, max_time_s: float,
                 on_episode: Callable[[EpisodeResult], None] | None = None,
                 lockstep: bool = False) -> list[EpisodeResult]:
    """Run (task, seed) jobs through the node graph; returns one result per job. `lockstep`:
    the simulator waits for the policy at each camera frame (ResetSim.lockstep)."""
    from iflybot_vla_policy.robot import load_robot
    from iflybot_vla_policy.ros import demo_driver

    robot = load_robot()
    proc = start_graph('sim', graph_overrides, out_dir / 'graph.log')
    demo_driver.init()
    driver = demo_driver.DemoDriver(frame_every=10**9)
    executor, _thread = demo_driver.spin_in_background(driver)
    results: list[EpisodeResult] = []
    try:
        for task, seed in jobs:
            if proc.poll() is not None:
                raise RuntimeError(f'the node graph exited with code {proc.returncode}; see '
                                   f'{out_dir / "graph.log"}')
            instruction = driver.reset(task, seed, lockstep=lockstep)
            before = driver.counts()
            wall = time.monotonic()
            success, duration, reason = driver.run_policy(instruction, max_time_s)
            wall = time.monotonic() - wall
            results.append(_episode_result(driver.taps, before, driver.counts(), robot, task,
                                           seed, instruction, success, duration,
                                           driver.reset_stamp_s))
            results[-1].real_time_factor = duration / wall if wall > 0 else math.nan
            if on_episode is not None:
                on_episode(results[-1])
    finally:
        stop_graph(proc)
        demo_driver.shutdown(driver, executor)
    return results


def _episode_result(taps, before: dict[str, int], after: dict[str, int], robot, task: str,
                    seed: int, instruction: str, success: bool, duration: float,
                    start: float = -math.inf) -> EpisodeResult:
    """One episode's metrics from the taps between two counts. Joint states stamped before
    `start` (the reset's stamp) still show the old scene: a reply can overtake them, and the
    reset's jump counted in an RMS jerk of ~10^4 instead of ~10^2."""
    window = lambda values, key: values[before[key]:after[key]]  # noqa: E731
    mt = np.asarray(window(taps.measured_t, 'measured'))
    mq = np.asarray(window(taps.measured_q, 'measured')).reshape(-1, robot.n_joints)
    cq = np.asarray(window(taps.commanded_q, 'commanded')).reshape(-1, robot.n_joints)
    cdq = np.asarray(window(taps.commanded_dq, 'commanded')).reshape(-1, robot.n_joints)
    arrivals = window(taps.trajectory_arrivals, 'arrivals')
    period = float(np.median(np.diff(arrivals))) if len(arrivals) > 2 else math.nan
    keep = np.concatenate([[True], np.diff(mt) > 0]) if len(mt) else np.zeros(0, bool)
    keep &= mt >= start
    holds: dict[str, int] = {}
    for reason in window(taps.holds, 'holds'):
        holds[hold_category(reason)] = holds.get(hold_category(reason), 0) + 1
    return EpisodeResult(
        task=task, seed=seed, instruction=instruction, success=success,
        duration_s=duration, time_to_success_s=duration if success else None,
        inference_ms=list(window(taps.chunk_latency_ms, 'latency')),
        control_jitter_p99_ms=jitter(arrivals, period)['p99_ms'] if period > 0 else math.nan,
        rms_jerk=rms_jerk(mt[keep], mq[keep]) if keep.sum() > 3 else math.nan,
        limit_violations=limit_violations(robot, cq, cdq),
        chunks=after['latency'] - before['latency'], hold_reasons=holds, grasp_measured=False,
        **_status_timing(window(taps.status_timing, 'status')))


def _status_timing(rows: Sequence[tuple[float, float, float]]) -> dict[str, float]:
    if not len(rows):
        return {}
    rates, jitters, e2e = np.asarray(rows, dtype=np.float64).T
    return {'control_rate_hz_min': float(rates.min()), 'timer_jitter_p99_ms': float(jitters.max()),
            'e2e_latency_p99_ms': float(e2e.max())}
