"""Specification of chunk execution: splicing strategies and the trajectories they produce."""
from __future__ import annotations

import numpy as np
import pytest

from iflybot_vla_policy.bench.chunking import simulate_rollout, smoothness
from iflybot_vla_policy.chunking import (
    STRATEGIES,
    ChunkExecutor,
    ChunkPlan,
    ExecutionConfig,
    blend_weights,
)
from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.safety import SafetyConfig, SafetyFilter

ROBOT = load_robot()
SAFETY = SafetyFilter(ROBOT, SafetyConfig())
DT = 1.0 / 30.0
SAMPLE_DT = 1e-3


def constant_chunk(value: float, horizon: int = 30, dim: int = 2) -> np.ndarray:
    return np.full((horizon, dim), value)


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_commanded_motion_stays_continuous_across_chunk_boundaries(strategy):
    """Chunks that disagree by centimetres, spliced with inference delay: sampled at 1 kHz the
    command never steps in position faster than v_max nor in velocity faster than a_max."""
    rollout = simulate_rollout(strategy, duration=3.0, noise=0.05, seed=1, sample_dt=SAMPLE_DT)
    m = smoothness(rollout)
    assert rollout['holds'] == []
    assert np.all(m['max_position_step'] <= SAFETY.limits.v_max * SAMPLE_DT * 1.01)
    assert np.all(m['max_velocity_step'] <= SAFETY.limits.a_max * SAMPLE_DT * 1.01)
    assert len(rollout['t']) > 2900   # the whole rollout was sampled


def test_blend_is_smoother_than_naive_replacement_on_the_same_chunks():
    jerk = {s: smoothness(simulate_rollout(s, duration=4.0, noise=0.03, seed=2), skip=1.0)
            ['jerk_rms'] for s in ('blend', 'naive')}
    assert jerk['blend'] < 0.7 * jerk['naive'], jerk


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_every_trajectory_starts_at_the_command_and_ends_at_rest(strategy):
    executor = ChunkExecutor(SAFETY, ExecutionConfig(strategy=strategy))
    executor.reset(ROBOT.home, 0.0)
    rng = np.random.default_rng(0)
    now = 0.1
    for _ in range(5):
        p0, v0 = executor.commanded(now)
        q = ROBOT.home + rng.normal(0, 0.05, 7) + np.linspace(0, 0.2, 30)[:, None]
        chunk = np.hstack([q, np.full((30, 1), 0.03)])
        traj, reason = executor.splice(chunk, DT, now - 0.08, now)
        assert reason == ''
        np.testing.assert_allclose(traj.positions[0], p0, atol=1e-9)
        np.testing.assert_allclose(traj.velocities[0], v0, atol=1e-9)
        assert np.all(np.diff(traj.times) > 0.0) and traj.times[0] == 0.0
        assert np.all(traj.velocities[-1] == 0.0)
        now += 0.2


def test_blend_keeps_the_old_actions_while_frozen_and_blends_towards_the_new():
    plan = ChunkPlan(ExecutionConfig(strategy='blend', commit_latency=0.1))
    plan.splice(constant_chunk(0.0), DT, t_obs=0.0, now=0.0)
    plan.splice(constant_chunk(1.0), DT, t_obs=0.2, now=0.3)
    times, values = plan.times, plan.values[:, 0]
    assert np.all(values[times < 0.4] == 0.0)                   # frozen up to now + latency
    after = times >= 0.4
    assert np.all(np.diff(values[after]) >= -1e-12)              # monotone towards the new
    assert np.all(values[times >= 30 * DT - DT / 2] == 1.0)     # new only after the old ends


def test_blend_weight_decays_from_one_to_zero():
    t = np.linspace(0.0, 1.0, 101)
    for schedule in ('smooth', 'exp'):
        w = blend_weights(t, freeze_until=0.2, old_end=1.0, schedule=schedule)
        assert np.all(w[t < 0.2] == 1.0) and w[-1] == 0.0
        assert np.all(np.diff(w) <= 1e-12)


@pytest.mark.parametrize('strategy', ['naive', 'rtc'])
def test_naive_and_rtc_replace_the_plan_with_the_new_chunk(strategy):
    # rtc: the policy continued the old chunk inside its denoiser; the plan takes it as it is
    plan = ChunkPlan(ExecutionConfig(strategy=strategy))
    plan.splice(constant_chunk(0.0), DT, t_obs=0.0, now=0.0)
    plan.splice(constant_chunk(1.0), DT, t_obs=0.2, now=0.3)
    np.testing.assert_allclose(plan.at(0.35), [1.0, 1.0])
    np.testing.assert_allclose(plan.times[0], 0.2)


def test_ensemble_averages_overlapping_chunks_with_exponential_weights():
    m = 0.5
    plan = ChunkPlan(ExecutionConfig(strategy='ensemble', ensemble_decay=m))
    plan.splice(constant_chunk(0.0), DT, t_obs=0.0, now=0.0)
    plan.splice(constant_chunk(1.0), DT, t_obs=0.2, now=0.3)
    expected = np.exp(-m) / (1.0 + np.exp(-m))   # oldest gets weight 1, newest exp(-m)
    np.testing.assert_allclose(plan.at(0.5), [expected, expected])
    np.testing.assert_allclose(plan.at(1.15), [1.0, 1.0])   # only the new chunk covers it


def test_non_finite_chunk_in_the_executor_becomes_a_hold():
    executor = ChunkExecutor(SAFETY, ExecutionConfig(strategy='naive'))
    executor.reset(ROBOT.home, 0.0)
    chunk = np.hstack([np.repeat(ROBOT.home[None], 30, axis=0), np.full((30, 1), 0.04)])
    chunk[10, 2] = np.nan
    traj, reason = executor.splice(chunk, DT, 0.0, 0.05)
    assert 'non-finite' in reason
    assert np.all(np.isfinite(traj.positions)) and np.all(traj.velocities[-1] == 0.0)
    assert executor.plan.empty


def test_hold_brakes_from_the_current_command():
    executor = ChunkExecutor(SAFETY, ExecutionConfig(strategy='blend'))
    executor.reset(ROBOT.home, 0.0)
    q = ROBOT.home + np.linspace(0, 0.5, 30)[:, None]
    executor.splice(np.hstack([q, np.full((30, 1), 0.04)]), DT, 0.0, 0.0)
    p0, v0 = executor.commanded(0.5)
    assert np.abs(v0).max() > 0.1
    traj = executor.hold(0.5)
    assert SAFETY.verify(traj, p0, v0) == ''
    assert traj.end - 0.5 <= np.max(np.abs(v0) / SAFETY.limits.a_max) + 0.05


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="'blend', 'rtc'"):
        ExecutionConfig(strategy='smooth')
