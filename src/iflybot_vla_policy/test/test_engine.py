"""Inference engine: cached-KV sampling equals recomputing the prefix, determinism, batching."""
from __future__ import annotations

import torch

from _vla_fixtures import robot_batch, small_model, wake
from iflybot_vla_policy.engine import InferenceEngine


def _engine(seed: int = 0, **overrides) -> tuple[InferenceEngine, dict]:
    model = wake(small_model(seed, **overrides))
    return InferenceEngine(model), robot_batch(model, batch=2)


def _sample(engine, batch, **kw):
    return engine.sample(batch['images'], batch['text_ids'], batch['text_mask'],
                         batch['state'], **kw)


def test_cached_kv_sampling_equals_recomputing_the_prefix_every_step():
    engine, batch = _engine()
    cached = _sample(engine, batch, seed=3)
    recomputed = _sample(engine, batch, seed=3, recompute_prefix_every_step=True)
    torch.testing.assert_close(cached.actions, recomputed.actions, atol=1e-5, rtol=1e-4)
    assert torch.equal(cached.latent_tokens, recomputed.latent_tokens)
    assert cached.actions.shape == (2, engine.cfg.action.horizon, engine.cfg.action.action_dim)


def test_same_seed_same_chunk_other_seed_other_chunk():
    engine, batch = _engine()
    a = _sample(engine, batch, seed=7).actions
    b = _sample(engine, batch, seed=7).actions
    c = _sample(engine, batch, seed=8).actions
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_a_generator_makes_successive_chunks_reproducible():
    engine, batch = _engine()
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(11)
        runs.append([_sample(engine, batch, generator=gen).actions for _ in range(2)])
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])


def test_batched_sampling_equals_one_sample_at_a_time():
    engine, batch = _engine()
    noise = engine.noise(2, seed=5)
    both = _sample(engine, batch, noise=noise)
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        single = _sample(engine, one, noise=noise[i:i + 1])
        torch.testing.assert_close(single.actions, both.actions[i:i + 1], atol=1e-5, rtol=1e-4)
        assert torch.equal(single.latent_tokens, both.latent_tokens[i:i + 1])


def test_sampling_runs_without_autograd_and_reports_stage_timings():
    engine, batch = _engine()
    out = _sample(engine, batch, seed=0)
    assert not out.actions.requires_grad
    assert {'prefix', 'latent', 'denoise', 'total'} <= set(out.timing_ms)


def test_more_euler_steps_are_a_runtime_option():
    engine, batch = _engine()
    five = _sample(engine, batch, seed=0)
    ten = _sample(engine, batch, seed=0, steps=10)
    assert five.actions.shape == ten.actions.shape
    assert not torch.allclose(five.actions, ten.actions)


def test_bfloat16_engine_stays_close_to_float32():
    engine, batch = _engine()
    ref = _sample(engine, batch, seed=0).actions
    low = InferenceEngine(engine.model, dtype='bfloat16')  # casts the model in place
    out = _sample(low, batch, seed=0).actions
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
