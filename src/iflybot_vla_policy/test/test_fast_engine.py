"""The fast inference path computes the eager path's chunk: same actions for the same seed (to
float rounding), same latent codes, for the tiny preset, the bundled checkpoint and small
transformers-family VLMs; its latent decoding equals the eager decode; it is one static graph
that torch.compile traces without a break and never recompiles for a new instruction or
image."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _vla_fixtures import (
    FAMILY_IMAGES,
    INSTRUCTIONS,
    family_config,
    observation,
    robot_batch,
    small_config,
    small_model,
    wake,
)
from conftest import REPO_ROOT
from iflybot_vla_policy.engine import InferenceEngine
from iflybot_vla_policy.model.vla import VLA
from iflybot_vla_policy.policy import Policy

# float32 on CPU: the fast path reorders some float operations (fused multiply-adds, the
# GroupNorm/FiLM and LayerNorm/adaLN affines folded into one), nothing else
TOL = {'atol': 1e-5, 'rtol': 1e-5}


def _family_model(kind: str, **overrides) -> VLA:
    torch.manual_seed(0)
    return wake(VLA(family_config(kind, **overrides)))


def _sample(engine: InferenceEngine, batch: dict, **kw):
    return engine.sample(batch['images'], batch['text_ids'], batch['text_mask'],
                         batch['state'], **kw)


def _assert_same_chunk(model: VLA, batch: dict, seed: int = 3) -> None:
    fast = _sample(InferenceEngine(model), batch, seed=seed)
    eager = _sample(InferenceEngine(model, eager=True), batch, seed=seed)
    assert torch.equal(fast.latent_tokens, eager.latent_tokens)
    torch.testing.assert_close(fast.actions, eager.actions, **TOL)
    assert eager.actions.abs().max() > 0.1    # a chunk that depends on the weights


@pytest.mark.parametrize('batch', [1, 2])
def test_fast_path_returns_the_eager_chunk_for_the_same_seed(batch):
    model = wake(small_model())
    _assert_same_chunk(model, robot_batch(model, batch=batch))


def test_fast_path_without_latent_tokens_returns_the_eager_chunk():
    """The bundled checkpoint's shape: the last LM layer's output is then never computed."""
    model = wake(small_model(**{'tokens.latent_tokens': 0}))
    _assert_same_chunk(model, robot_batch(model, batch=2))


@pytest.mark.parametrize('kind', sorted(FAMILY_IMAGES))
def test_fast_path_returns_the_eager_chunk_on_transformers_vlms(kind):
    model = _family_model(kind)
    _assert_same_chunk(model, robot_batch(model, batch=2))


@pytest.mark.parametrize('kind', ['tiny', 'qwen2_5_vl'])
def test_static_latent_decoding_equals_the_eager_decode(kind):
    """Preallocated KV buffers, fixed slots and masks: the codes and the extended cache of
    `generate_latents` (for Qwen2.5-VL with the appended tokens' mRoPE positions)."""
    model = wake(small_model()) if kind == 'tiny' else _family_model(kind)
    bb, n = model.backbone, model.cfg.tokens.latent_tokens
    batch = robot_batch(model, batch=2)
    args = (batch['images'], batch['text_ids'], batch['text_mask'])
    with torch.inference_mode():
        codes, ext = bb.generate_latents(bb.encode_prefix(*args), n)
        fast_codes, fast_ext = bb.decode_latents_static(
            bb.encode_prefix_fast(*args, latent_slots=n), n)
    assert torch.equal(fast_codes, codes)
    assert torch.equal(fast_ext.mask, ext.mask)
    assert torch.equal(fast_ext.next_pos, ext.next_pos)
    for (k1, v1), (k2, v2) in zip(fast_ext.kv, ext.kv, strict=True):
        torch.testing.assert_close(k1, k2, **TOL)
        torch.testing.assert_close(v1, v2, **TOL)


def test_uint8_images_are_normalised_inside_the_fast_path():
    model = wake(small_model())
    batch = robot_batch(model, batch=1)
    pixels = (batch['images'] * 255).round().to(torch.uint8)
    engine = InferenceEngine(model)
    as_bytes = _sample(engine, {**batch, 'images': pixels}, seed=0).actions
    as_float = _sample(engine, {**batch, 'images': pixels.float() / 255}, seed=0).actions
    torch.testing.assert_close(as_bytes, as_float, **TOL)


def test_fast_path_follows_in_place_weight_updates():
    """Its derived weights (fused, transposed, channels-last) are cached; an optimiser-style
    update of the vision tower, the LM or the expert must show in the next chunk."""
    model = wake(small_model())
    batch = robot_batch(model, batch=1)
    fast = InferenceEngine(model)
    before = _sample(fast, batch, seed=0).actions
    with torch.no_grad():
        model.backbone.vision.stages[1].conv.weight.mul_(1.5)
        model.backbone.decoder.layers[0].self_attn.k_proj.weight.add_(0.05)
        model.expert.blocks[0].qkv.weight.mul_(-1.0)
    after = _sample(fast, batch, seed=0).actions
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _sample(InferenceEngine(model, eager=True), batch,
                                              seed=0).actions, **TOL)


def test_one_graph_serves_every_instruction_and_image_without_recompiling():
    """As LeRobot checks its compiled pi0: after warm-up, chunks with other instructions,
    images, states and noise add no graph, no recompilation and no graph break (dynamo's
    'eager' backend traces the same graph inductor or CUDA graphs would compile)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = wake(small_model())
    cfg = model.cfg
    engine = InferenceEngine(model, compile='eager')
    ids, mask = model.tokenizer.encode('warm up', cfg.backbone.max_text_tokens)
    engine.warm_up(torch.tensor(ids), torch.tensor(mask))
    graphs = counters['stats']['unique_graphs']
    assert graphs >= 1
    reference = InferenceEngine(model)
    gen = torch.Generator().manual_seed(0)
    for i, text in enumerate((*INSTRUCTIONS, 'stack the purple cube on the green cube', '')):
        ids, mask = model.tokenizer.encode(text, cfg.backbone.max_text_tokens)
        batch = {'images': torch.randint(0, 256, (1, len(cfg.cameras), 3, cfg.image_size,
                                                  cfg.image_size), generator=gen,
                                         dtype=torch.uint8),
                 'text_ids': torch.tensor([ids]), 'text_mask': torch.tensor([mask]),
                 'state': torch.randn(1, cfg.action.state_dim, generator=gen)}
        out = _sample(engine, batch, seed=i)
        torch.testing.assert_close(out.actions, _sample(reference, batch, seed=i).actions,
                                   **TOL)
    assert counters['stats']['unique_graphs'] == graphs
    assert not counters['graph_break']
    assert not counters['recompiles']
    torch._dynamo.reset()


def test_policies_run_the_fast_path_unless_told_and_report_their_warm_up():
    fast = Policy.from_config(small_config(), seed=0)
    eager = Policy.from_config(small_config(), seed=0, eager=True)
    assert not fast.engine.eager and eager.engine.eager
    assert fast.warmup_s is not None and fast.warmup_s > 0
    assert Policy.from_config(small_config(), seed=0, warm_up=False).warmup_s is None
    for p in (fast, eager):
        wake(p.model)
    obs = observation(fast.cfg, seed=1)
    np.testing.assert_allclose(fast.infer(obs, seed=5)['actions'],
                               eager.infer(obs, seed=5)['actions'], atol=1e-5, rtol=1e-5)


def test_the_bundled_checkpoint_gives_the_eager_actions():
    """Trained weights (128 px, no latent tokens), through Policy.infer: robot-space actions
    (radians, metres) equal to 1e-5."""
    ckpt = REPO_ROOT / 'checkpoints' / 'tiny_pick_place'
    fast = Policy.from_checkpoint(ckpt, seed=0)
    eager = Policy.from_checkpoint(ckpt, seed=0, eager=True, warm_up=False)
    for i, text in enumerate(INSTRUCTIONS):
        obs = observation(fast.cfg, seed=i, size=(128, 128), instruction=text)
        np.testing.assert_allclose(fast.infer(obs, seed=i)['actions'],
                                   eager.infer(obs, seed=i)['actions'], atol=1e-5, rtol=1e-5)
