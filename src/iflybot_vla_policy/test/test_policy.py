"""Policy: the infer contract, observation validation, checkpoints, transforms."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _vla_fixtures import observation, small_config, wake
from iflybot_vla_policy.config import get_config
from iflybot_vla_policy.policy import Policy
from iflybot_vla_policy.transforms import NormStats, NormStatsSet, Transforms, resize_pad


@pytest.fixture(scope='module')
def policy() -> Policy:
    p = Policy.from_config(small_config(), seed=0)
    wake(p.model)
    stats = NormStatsSet(NormStats.from_data(np.random.default_rng(0).normal(0, 0.5, (100, 8))),
                         NormStats.from_data(np.random.default_rng(1).normal(0, 0.2, (100, 8))))
    p.norm_stats = stats
    return p


def test_infer_returns_an_action_chunk(policy: Policy):
    out = policy.infer(observation(policy.cfg), seed=0)
    cfg = policy.cfg
    assert out['actions'].shape == (cfg.action.horizon, 8)
    assert out['actions'].dtype == np.float32
    assert out['dt'] == pytest.approx(cfg.action.dt)
    assert out['latent_tokens'].shape == (cfg.tokens.latent_tokens,)
    assert {'preprocess', 'prefix', 'latent', 'denoise', 'total'} <= set(out['timing_ms'])
    width = out['actions'][:, 7]
    assert (width >= 0).all() and (width <= 0.08).all()  # gripper opening within the FR3 hand


def test_any_camera_resolution_is_accepted(policy: Policy):
    a = policy.infer(observation(policy.cfg, size=(480, 640)), seed=0)['actions']
    b = policy.infer(observation(policy.cfg, size=(31, 17)), seed=0)['actions']
    assert a.shape == b.shape


def test_infer_batch_matches_single_inference(policy: Policy):
    obs = [observation(policy.cfg, seed=s) for s in (0, 1)]
    batch = policy.infer_batch(obs, seed=4)
    assert batch['actions'].shape == (2, policy.cfg.action.horizon, 8)


def test_save_then_load_gives_identical_actions(policy: Policy, tmp_path: Path):
    policy.save(tmp_path / 'ckpt')
    names = sorted(p.name for p in (tmp_path / 'ckpt').iterdir())
    assert names == ['config.yaml', 'model.safetensors', 'norm_stats.json', 'tokenizer.json']
    loaded = Policy.from_checkpoint(tmp_path / 'ckpt')
    obs = observation(policy.cfg, seed=2)
    np.testing.assert_array_equal(loaded.infer(obs, seed=9)['actions'],
                                  policy.infer(obs, seed=9)['actions'])


def test_a_checkpoint_runs_with_its_bundle_noise_scale_unless_told(policy: Policy,
                                                                   tmp_path: Path):
    ckpt = policy.save(tmp_path / 'ckpt')
    assert Policy.from_checkpoint(ckpt).noise_scale == 1.0
    (ckpt / 'bundle.yaml').write_text('inference: {noise_scale: 0.0}\n')
    loaded = Policy.from_checkpoint(ckpt)
    obs = observation(loaded.cfg)
    assert loaded.noise_scale == 0.0
    np.testing.assert_array_equal(loaded.infer(obs, seed=1)['actions'],
                                  loaded.infer(obs, seed=2)['actions'])
    assert Policy.from_checkpoint(ckpt, noise_scale=1.0).noise_scale == 1.0
    (ckpt / 'bundle.yaml').write_text('inference: {noise_scale: 2}\n')
    with pytest.raises(ValueError, match='inference.noise_scale'):
        Policy.from_checkpoint(ckpt)


def test_seeded_policies_are_deterministic():
    cfg = small_config()
    obs = observation(cfg)
    a = Policy.from_config(cfg, seed=3)
    b = Policy.from_config(cfg, seed=3)
    wake(a.model)
    wake(b.model)
    np.testing.assert_array_equal(a.infer(obs)['actions'], b.infer(obs)['actions'])
    # the policy's own generator moves on: the next chunk draws fresh noise
    assert not np.array_equal(a.infer(obs)['actions'], Policy.from_config(cfg, seed=4).infer(
        obs)['actions'])


def test_noise_scale_zero_is_deterministic_and_one_is_the_default(policy: Policy):
    obs = observation(policy.cfg, seed=5)
    scaled = Policy(policy.cfg, policy.model, policy.norm_stats, noise_scale=0.0)
    assert np.array_equal(scaled.infer(obs, seed=1)['actions'],
                          scaled.infer(obs, seed=2)['actions'])
    assert not np.array_equal(policy.infer(obs, seed=1)['actions'],
                              policy.infer(obs, seed=2)['actions'])
    unit = Policy(policy.cfg, policy.model, policy.norm_stats, noise_scale=1.0)
    np.testing.assert_array_equal(unit.infer(obs, seed=1)['actions'],
                                  policy.infer(obs, seed=1)['actions'])
    with pytest.raises(ValueError, match='noise_scale'):
        Policy(policy.cfg, policy.model, noise_scale=-0.5)


def _bad(obs, **changes):
    out = {**obs, 'images': dict(obs['images'])}
    for key, value in changes.items():
        if key in ('scene_camera', 'wrist_camera'):
            if value is None:
                del out['images'][key]
            else:
                out['images'][key] = value
        elif value is None:
            del out[key]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize('changes,message', [
    ({'wrist_camera': None}, "missing camera 'wrist_camera'"),
    ({'scene_camera': np.zeros((48, 64), np.uint8)}, r'shape \(H, W, 3\)'),
    ({'scene_camera': np.zeros((48, 64, 3), np.float32)}, 'uint8'),
    ({'state': np.zeros(7, np.float32)}, r'shape \(8,\)'),
    ({'state': np.array([0, 0, 0, np.nan, 0, 0, 0, 0.04], np.float32)}, 'NaN'),
    ({'state': [0.0] * 8}, 'float numpy array'),
    ({'instruction': '  '}, 'non-empty'),
    ({'instruction': None}, "missing key 'instruction'"),
])
def test_infer_rejects_bad_observations(policy: Policy, changes, message):
    with pytest.raises(ValueError, match=message):
        policy.infer(_bad(observation(policy.cfg), **changes))


def test_missing_checkpoint_files_are_named(policy: Policy, tmp_path: Path):
    ckpt = policy.save(tmp_path / 'ckpt')
    (ckpt / 'norm_stats.json').unlink()
    with pytest.raises(FileNotFoundError, match='norm_stats.json'):
        Policy.from_checkpoint(ckpt)
    with pytest.raises(FileNotFoundError, match='checkpoint directory not found'):
        Policy.from_checkpoint(tmp_path / 'nothing')


def test_truncated_weights_are_named(policy: Policy, tmp_path: Path):
    ckpt = policy.save(tmp_path / 'ckpt')
    data = (ckpt / 'model.safetensors').read_bytes()
    (ckpt / 'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r'model\.safetensors.*truncated'):
        Policy.from_checkpoint(ckpt)


def test_config_and_weights_mismatch_names_the_key(policy: Policy, tmp_path: Path):
    ckpt = policy.save(tmp_path / 'ckpt')
    text = (ckpt / 'config.yaml').read_text().replace('mlp_ratio: 4.0', 'mlp_ratio: 2.0')
    (ckpt / 'config.yaml').write_text(text)
    with pytest.raises(ValueError, match=r"model\.safetensors: key 'expert\.blocks\.0\.mlp"):
        Policy.from_checkpoint(ckpt)


def test_bad_config_key_in_checkpoint_is_named(policy: Policy, tmp_path: Path):
    ckpt = policy.save(tmp_path / 'ckpt')
    text = (ckpt / 'config.yaml').read_text().replace('horizon:', 'horizn:')
    (ckpt / 'config.yaml').write_text(text)
    with pytest.raises(ValueError, match=r"config\.yaml.*'action\.horizn'"):
        Policy.from_checkpoint(ckpt)


def test_norm_stats_of_wrong_width_are_named(policy: Policy, tmp_path: Path):
    ckpt = policy.save(tmp_path / 'ckpt')
    NormStatsSet(NormStats.identity(8), NormStats.identity(7)).save(ckpt / 'norm_stats.json')
    with pytest.raises(ValueError, match=r"norm_stats\.json: key 'actions' has 7 dims"):
        Policy.from_checkpoint(ckpt)


def test_joint_actions_round_trip_through_the_model_space():
    cfg = get_config('tiny')
    rng = np.random.default_rng(0)
    tf = Transforms(cfg, NormStatsSet(NormStats.from_data(rng.normal(size=(50, 8))),
                                      NormStats.from_data(rng.normal(size=(50, 8))), 'quantile'))
    state = np.r_[rng.uniform(-1, 1, 7), 0.03]
    actions = np.c_[state[:7] + rng.normal(0, 0.1, (16, 7)), np.full(16, 0.05)]
    model = tf.actions_to_model(actions, state)
    assert model.shape == (16, cfg.action.action_dim)
    np.testing.assert_allclose(tf.actions_from_model(model, state), actions, atol=1e-5)


def test_ee_delta_policy_outputs_seven_dims():
    cfg = small_config(**{'action.space': 'ee_delta'})
    out = Policy.from_config(cfg).infer(observation(cfg), seed=0)
    assert out['actions'].shape == (cfg.action.horizon, 7)


def test_images_are_letterboxed_to_the_model_size():
    img = np.full((40, 80, 3), 255, np.uint8)
    out = resize_pad(img, 64)
    assert out.shape == (3, 64, 64)
    assert torch.all(out[:, 16:48] > 0.99) and torch.all(out[:, :16] == 0)


def test_checkpoint_carries_the_fast_tokenizer_and_the_lam(tmp_path: Path):
    from iflybot_vla_policy.model.fast import FastConfig, FastTokenizer
    from iflybot_vla_policy.model.lam import LAMConfig, LatentActionModel

    cfg = small_config()
    rng = np.random.default_rng(0)
    chunks = np.cumsum(rng.normal(0, 0.05, (64, cfg.action.horizon, 8)), axis=1)
    fast = FastTokenizer(FastConfig(vocab_size=cfg.tokens.fast_vocab)).fit(chunks)
    torch.manual_seed(0)
    lam = LatentActionModel(LAMConfig(image_size=32, patch=8, width=32, depth=1,
                                      decoder_depth=1))
    base = Policy.from_config(cfg)
    assert base.fast is None and base.lam is None
    policy = Policy(cfg, base.model, fast=fast, lam=lam)
    ckpt = policy.save(tmp_path / 'ckpt')
    assert (ckpt / 'fast').is_dir() and (ckpt / 'lam').is_dir()
    loaded = Policy.from_checkpoint(ckpt)
    assert loaded.fast.encode(chunks[0]) == fast.encode(chunks[0])
    for key, value in lam.state_dict().items():
        torch.testing.assert_close(loaded.lam.state_dict()[key], value)
