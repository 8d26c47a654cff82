"""Real-time chunking in the denoiser (rtc.py): the paper's weights and guidance weight, the
frozen steps come back exactly, no guidance is plain sampling, the fast and eager paths agree,
`Policy.infer(previous=...)`, and the delayed closed loop hands the old chunk to the policy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _vla_fixtures import observation, robot_batch, small_model, wake
from iflybot_vla_policy.engine import InferenceEngine
from iflybot_vla_policy.model.action_expert import flow_times
from iflybot_vla_policy.policy import Policy
from iflybot_vla_policy.rtc import RTCConfig, RTCGuide, guidance_weight, prefix_weights
from iflybot_vla_policy.rtc import sample as rtc_sample

TOL = {'atol': 1e-5, 'rtol': 1e-5}


def test_prefix_weights_are_the_papers_exponential_decay_between_delay_and_overlap_end():
    w = prefix_weights(horizon=10, delay=2, overlap=6)
    assert w[:2].tolist() == [1.0, 1.0]
    c = (6 - np.arange(2, 6)) / (6 - 2 + 1)                     # 0.8, 0.6, 0.4, 0.2
    np.testing.assert_allclose(w[2:6], c * np.expm1(c) / (math.e - 1), rtol=1e-6)
    assert w[6:].tolist() == [0.0] * 4
    assert bool((w[2:6][1:] < w[2:6][:-1]).all())
    np.testing.assert_allclose(prefix_weights(10, 2, 6, 'linear')[2:6], c, rtol=1e-6)
    assert prefix_weights(10, 2, 6, 'zeros').tolist() == [1.0, 1.0] + [0.0] * 8
    with pytest.raises(ValueError, match='schedule'):
        prefix_weights(10, 2, 6, 'cosine')


def test_guidance_weight_is_the_clipped_pigdm_weight():
    assert guidance_weight(1.0, 5.0) == 5.0                     # pure noise: clipped to beta
    assert guidance_weight(0.5, 5.0) == pytest.approx(2.0)      # (1/4 + 1/4) / (1/4)
    assert guidance_weight(0.2, 5.0) == pytest.approx(0.68 / 0.16)
    assert guidance_weight(0.5, 1.5) == 1.5


def test_guide_checks_the_previous_actions():
    with pytest.raises(ValueError, match='delay'):
        RTCGuide.build(torch.zeros(1, 3, 4), delay=4, horizon=8, action_dim=4)
    with pytest.raises(ValueError, match='exceed'):
        RTCGuide.build(torch.zeros(1, 9, 4), delay=1, horizon=8, action_dim=4)
    with pytest.raises(ValueError, match='schedule'):
        RTCConfig(schedule='cosine')


@pytest.fixture(scope='module')
def setup():
    model = wake(small_model())
    batch = robot_batch(model, batch=2)
    a = model.cfg.action
    noise = torch.randn(2, a.horizon, a.action_dim, generator=torch.Generator().manual_seed(5))
    return model, batch, noise


def _sample(engine: InferenceEngine, batch: dict, noise: torch.Tensor, guide=None):
    return engine.sample(batch['images'], batch['text_ids'], batch['text_mask'],
                         batch['state'], noise=noise, rtc=guide).actions


def _previous(model, plain: torch.Tensor, shift: int = 4) -> torch.Tensor:
    """The plain chunk moved by `shift` steps and offset: a previous chunk the new one is not."""
    return plain[:, shift:] + 0.5


@pytest.mark.parametrize('eager', [False, True])
def test_frozen_steps_come_back_exactly_and_the_overlap_is_pulled_to_the_old_chunk(
        setup, eager):
    model, batch, noise = setup
    engine = InferenceEngine(model, eager=eager)
    a = model.cfg.action
    plain = _sample(engine, batch, noise)
    prev = _previous(model, plain)                               # (2, H - 4, D)
    guide = RTCGuide.build(prev, delay=3, horizon=a.horizon, action_dim=a.action_dim)
    out = _sample(engine, batch, noise, guide)
    assert torch.equal(out[:, :3], prev[:, :3])
    hard_only = _sample(engine, batch, noise, RTCGuide.build(
        prev, 3, a.horizon, a.action_dim, RTCConfig(schedule='zeros')))
    assert torch.equal(hard_only[:, :3], prev[:, :3])
    assert not torch.allclose(out[:, 3:], hard_only[:, 3:], atol=1e-3)   # the guidance acts
    assert not torch.allclose(hard_only[:, 3:], plain[:, 3:], atol=1e-3)  # so does freezing


def test_guidance_pulls_the_overlap_to_the_old_chunk_by_its_weights():
    """With the exact velocity of N(0, I) data (the denoised estimate is known in closed form),
    the weighted overlap follows the old chunk: exactly with weight 1, more the larger the
    weight, not at all past the old chunk's end."""
    steps = 5
    times = flow_times(steps)

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        t = times[i]
        denoised = (1 - t) * x / (t * t + (1 - t) ** 2)
        return (x - denoised) / t

    noise = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0))
    old = torch.full((1, 12, 4), 2.0)

    def error(schedule: str) -> torch.Tensor:
        out = rtc_sample(velocity, noise, steps,
                         RTCGuide.build(old, 3, 16, 4, RTCConfig(schedule=schedule)))
        return (out[0, :12] - old[0]).abs().mean(dim=1)                  # (12,)

    free, exp, ones = error('zeros'), error('exp'), error('ones')
    assert float(free[:3].max()) == 0.0 and float(ones.max()) < 1e-3
    assert bool((exp[3:] < free[3:]).all())
    assert float(exp[3]) < 0.2 < 1.0 < float(free[3:].min())
    plain = rtc_sample(velocity, noise, steps, RTCGuide.build(old, 0, 16, 4,
                                                              RTCConfig(schedule='zeros')))
    torch.testing.assert_close(rtc_sample(velocity, noise, steps, RTCGuide.build(
        old, 3, 16, 4))[:, 12:], plain[:, 12:], atol=0.0, rtol=0.0)


@pytest.mark.parametrize('eager', [False, True])
def test_no_frozen_steps_and_zero_weights_is_plain_sampling(setup, eager):
    model, batch, noise = setup
    engine = InferenceEngine(model, eager=eager)
    a = model.cfg.action
    plain = _sample(engine, batch, noise)
    guide = RTCGuide.build(plain[:, 4:] + 0.5, delay=0, horizon=a.horizon,
                           action_dim=a.action_dim, config=RTCConfig(schedule='zeros'))
    torch.testing.assert_close(_sample(engine, batch, noise, guide), plain, atol=1e-6,
                               rtol=1e-6)
    beta0 = RTCGuide.build(plain[:, 4:] + 0.5, 0, a.horizon, a.action_dim,
                           RTCConfig(max_guidance=0.0))
    torch.testing.assert_close(_sample(engine, batch, noise, beta0), plain, atol=1e-6,
                               rtol=1e-6)


def test_guided_chunk_is_deterministic_and_the_same_on_the_fast_and_eager_paths(setup):
    model, batch, noise = setup
    a = model.cfg.action
    fast, eager = InferenceEngine(model), InferenceEngine(model, eager=True)
    guide = RTCGuide.build(_previous(model, _sample(fast, batch, noise)), 2, a.horizon,
                           a.action_dim)
    first = _sample(fast, batch, noise, guide)
    assert torch.equal(first, _sample(fast, batch, noise, guide))
    torch.testing.assert_close(_sample(eager, batch, noise, guide), first, **TOL)
    # the guided loop leaves the fast path's cached inference weights usable afterwards
    plain = _sample(fast, batch, noise)
    torch.testing.assert_close(plain, _sample(eager, batch, noise), **TOL)


def test_policy_infer_with_previous_returns_its_delayed_actions_and_is_seeded():
    policy = Policy.from_config('tiny', seed=0, warm_up=False, noise_scale=1.0)
    wake(policy.model)
    obs = observation(policy.cfg)
    plain = policy.infer(obs, seed=3)['actions']                 # (H, 8)
    previous = plain[5:] + np.float32(0.02)
    out = policy.infer(obs, seed=3, previous=previous, inference_delay=2)
    np.testing.assert_array_equal(out['actions'][:2], previous[:2])
    np.testing.assert_array_equal(
        out['actions'], policy.infer(obs, seed=3, previous=previous,
                                     inference_delay=2)['actions'])
    assert not np.allclose(out['actions'][2:], plain[2:])
    with pytest.raises(ValueError, match='delay'):
        policy.infer(obs, seed=3, previous=previous[:1], inference_delay=2)


class _RecordingPolicy:
    """Holds the arm where it is observed, a little further each call; records the calls."""

    horizon, dt = 16, 0.1

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def infer(self, obs: dict, **kwargs) -> dict:
        self.calls.append(kwargs)
        q = np.asarray(obs['state'], np.float64)
        chunk = np.repeat(q[None], self.horizon, axis=0)
        chunk[:, :7] += 1e-3 * len(self.calls) * np.arange(self.horizon)[:, None] / self.horizon
        self.calls[-1]['chunk'] = chunk
        return {'actions': chunk.astype(np.float32), 'dt': self.dt}


def test_delayed_rollout_hands_the_running_chunks_remainder_to_an_rtc_policy():
    from iflybot_vla_policy.eval.rollout import RolloutConfig, run_episode
    from iflybot_vla_policy.robot import load_robot
    from iflybot_vla_policy.safety import SafetyFilter

    policy = _RecordingPolicy()
    config = RolloutConfig(max_time_s=1.95, replan_steps=4, image_size=(32, 32),
                           inference_delay_s=0.3, chunking='rtc')
    result = run_episode(policy, 'pick_place', 0, config, SafetyFilter(load_robot()))
    # every 4 periods an observation; the first chunk starts after the 3-period delay
    assert result.chunks == len(policy.calls) == 5
    assert policy.calls[0].keys() == {'chunk'}
    for before, call in zip(policy.calls, policy.calls[1:], strict=False):
        assert call['inference_delay'] == 3
        np.testing.assert_allclose(call['previous'], before['chunk'][4:], atol=1e-6)
    with pytest.raises(ValueError, match='chunking'):
        RolloutConfig(chunking='ensemble')


def test_blend_keeps_the_old_action_at_the_splice_and_ends_on_the_new_chunk():
    from iflybot_vla_policy.eval.rollout import _blend

    old, new = np.zeros((6, 2)), np.ones((10, 2))
    out = _blend(old, new, delay=2)
    assert out[:3].tolist() == [[0.0, 0.0]] * 3                 # up to and at the splice
    assert bool(np.all(np.diff(out[2:6, 0]) > 0))
    assert out[5:].tolist() == [[1.0, 1.0]] * 5                 # from the old chunk's end
    short = _blend(np.zeros((12, 2)), np.ones((8, 2)), delay=2)     # a truncated new chunk
    assert short.shape == (8, 2) and short[2].tolist() == [0.0, 0.0]


def test_delayed_rollout_survives_chunks_the_workspace_box_cuts_short():
    """A vetted chunk cut inside the delay holds (the old chunk runs on); one cut after it runs
    (a cut chunk made the delayed rollout raise)."""
    import dataclasses

    from iflybot_vla_policy.eval.rollout import RolloutConfig, run_episode
    from iflybot_vla_policy.robot import load_robot
    from iflybot_vla_policy.safety import SafetyFilter

    class Cutting(SafetyFilter):
        def __init__(self, keep: list[int]) -> None:
            super().__init__(load_robot())
            self.keep = keep

        def check_chunk(self, actions, dt, q_measured):
            check = super().check_chunk(actions, dt, q_measured)
            k = self.keep.pop(0) if self.keep else len(check.positions)
            return dataclasses.replace(check, positions=check.positions[:k],
                                       gripper=check.gripper[:k])

    config = RolloutConfig(max_time_s=1.95, replan_steps=4, image_size=(32, 32),
                           inference_delay_s=0.3, chunking='blend')
    result = run_episode(_RecordingPolicy(), 'pick_place', 0, config, Cutting([16, 2, 5]))
    assert result.hold_reasons == {'chunk truncated within the inference delay': 1}
    assert result.chunks == 6     # periods 0, 4, 7 (the held one took only the delay), 11, 15, 19
