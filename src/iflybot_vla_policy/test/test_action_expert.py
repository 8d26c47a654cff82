"""Action expert: shapes, cross-attention masking, grouped/projection geometry, flow matching."""
from __future__ import annotations

import torch

from _vla_fixtures import small_config
from iflybot_vla_policy.model.action_expert import (
    ActionExpert,
    euler_sample,
    flow_targets,
    sample_flow_time,
)


def _expert(vlm_head_dim: int = 32, kv_heads: int = 1, feature_dim: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    cfg = small_config(**{'expert.direct_vision': bool(feature_dim)})
    ex = ActionExpert(cfg, n_layers=2, kv_heads=kv_heads, vlm_head_dim=vlm_head_dim,
                      feature_dim=feature_dim)
    with torch.no_grad():  # leave adaLN-Zero: make every path live, as after training
        for p in ex.parameters():
            if not bool(p.any()):
                p.normal_(0, 0.05)
    return cfg, ex


def _inputs(cfg, kv_heads=1, head_dim=32, seq=10, batch=2):
    gen = torch.Generator().manual_seed(1)
    kv = [(torch.randn(batch, kv_heads, seq, head_dim, generator=gen),
           torch.randn(batch, kv_heads, seq, head_dim, generator=gen)) for _ in range(2)]
    state = torch.randn(batch, cfg.action.state_dim, generator=gen)
    x = torch.randn(batch, cfg.action.horizon, cfg.action.action_dim, generator=gen)
    return kv, state, x, torch.full((batch,), 0.5)


def test_expert_predicts_a_velocity_per_action_step():
    cfg, ex = _expert()
    kv, state, x, t = _inputs(cfg)
    v = ex(state, x, t, ex.context(kv, torch.ones(2, 10, dtype=torch.bool)))
    assert v.shape == (2, cfg.action.horizon, cfg.action.action_dim)


def test_masked_positions_do_not_influence_the_output():
    """FAST tokens and padding are masked out: changing their keys/values changes nothing."""
    cfg, ex = _expert()
    kv, state, x, t = _inputs(cfg)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    base = ex(state, x, t, ex.context(kv, mask))
    changed = [(k.clone(), v.clone()) for k, v in kv]
    for k, v in changed:
        k[:, :, 7:] = 100.0
        v[:, :, 7:] = -100.0
    torch.testing.assert_close(ex(state, x, t, ex.context(changed, mask)), base)
    changed[0][0][:, :, 3] += 1.0  # an attended position does matter
    assert not torch.allclose(ex(state, x, t, ex.context(changed, mask)), base)


def test_kv_is_projected_when_head_widths_differ_and_grouped_heads_share_it():
    cfg, ex = _expert(vlm_head_dim=48, kv_heads=2)
    assert ex.blocks[0].k_proj.in_features == 2 * 48
    kv, state, x, t = _inputs(cfg, kv_heads=2, head_dim=48)
    ctx = ex.context(kv, torch.ones(2, 10, dtype=torch.bool))
    assert ctx.keys[0].shape == (2, 2, 10, cfg.expert.width // cfg.expert.heads)
    assert ex(state, x, t, ctx).shape == (2, cfg.action.horizon, cfg.action.action_dim)
    _, same = _expert(vlm_head_dim=32)
    assert same.blocks[0].k_proj is None  # equal widths: the VLM's KV is used as is


def test_direct_vision_features_extend_the_attended_keys():
    cfg, ex = _expert(feature_dim=24)
    kv, state, x, t = _inputs(cfg)
    feats = torch.randn(2, 5, 24)
    ctx = ex.context(kv, torch.ones(2, 10, dtype=torch.bool), feats, torch.randn(2, 24))
    assert ctx.keys[0].shape[2] == 15 and ctx.mask.shape[-1] == 15
    v1 = ex(state, x, t, ctx)
    other = feats + torch.randn(feats.shape, generator=torch.Generator().manual_seed(3))
    ctx2 = ex.context(kv, torch.ones(2, 10, dtype=torch.bool), other, ctx.summary)
    assert not torch.allclose(ex(state, x, t, ctx2), v1)


def test_flow_path_interpolates_from_actions_to_noise():
    actions, noise = torch.randn(3, 8, 4), torch.randn(3, 8, 4)
    x0, u = flow_targets(actions, noise, torch.zeros(3))
    x1, _ = flow_targets(actions, noise, torch.ones(3))
    torch.testing.assert_close(x0, actions)
    torch.testing.assert_close(x1, noise)
    torch.testing.assert_close(u, noise - actions)


def test_timesteps_follow_pi0_beta_and_favour_noisy_times():
    cfg = small_config()
    t = sample_flow_time(20000, cfg, generator=torch.Generator().manual_seed(0))
    assert t.min() >= cfg.flow.t_min and t.max() <= 1.0
    assert abs(t.mean().item() - (0.001 + 0.999 * 0.6)) < 0.01  # Beta(1.5, 1) mean 0.6


def test_euler_sampling_recovers_actions_given_the_exact_velocity():
    """With the true velocity (noise - a) the N-step Euler integral lands on a exactly."""
    cfg, ex = _expert()
    target = torch.randn(1, cfg.action.horizon, cfg.action.action_dim)
    noise = torch.randn_like(target)

    class Oracle(torch.nn.Module):
        def forward(self, state, x, t, ctx):
            return noise - target

    out = euler_sample(Oracle(), torch.zeros(1, 8), noise, lambda i: None, steps=5)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)
