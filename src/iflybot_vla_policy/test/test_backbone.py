"""VLM backbones: prefix KV cache, latent generation with the cache, tokenizer, the three
families, and the paper preset's shapes without allocating its weights."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _vla_fixtures import (
    INSTRUCTIONS,
    family_config,
    robot_batch,
    small_config,
    small_model,
    wake,
)
from iflybot_vla_policy.config import get_config
from iflybot_vla_policy.model.backbone import build_backbone
from iflybot_vla_policy.model.text_tokenizer import TextTokenizer
from iflybot_vla_policy.model.vla import VLA


def test_tiny_prefix_exposes_one_kv_pair_per_layer():
    model = small_model()
    batch = robot_batch(model, batch=2)
    bb = model.backbone
    with torch.no_grad():
        prefix = bb.encode_prefix(batch['images'], batch['text_ids'], batch['text_mask'])
    n_img = bb.vision.n_tokens
    seq = n_img + model.cfg.backbone.max_text_tokens
    assert len(prefix.kv) == model.cfg.backbone.layers
    for k, v in prefix.kv:
        assert k.shape == v.shape == (2, bb.kv_heads, seq, bb.head_dim)
    assert prefix.mask.shape == (2, seq)
    assert prefix.mask[:, :n_img].all()
    assert prefix.mask[:, n_img:].sum(1).tolist() == batch['text_mask'].sum(1).tolist()
    assert prefix.next_logits.shape == (2, model.cfg.vocab_size)


def test_instruction_padding_does_not_change_the_prefix_readout():
    torch.manual_seed(0)
    short = VLA(small_config(**{'backbone.max_text_tokens': 12}))
    long = VLA(small_config(**{'backbone.max_text_tokens': 20}), short.tokenizer)
    long.load_state_dict(short.state_dict())
    images = torch.rand(1, 2, 3, 64, 64)
    outs = []
    for model, n in ((short, 12), (long, 20)):
        ids, mask = model.tokenizer.encode(INSTRUCTIONS[1], n)
        with torch.no_grad():
            p = model.backbone.encode_prefix(images, torch.tensor([ids]), torch.tensor([mask]))
        outs.append(p.next_logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_latents_generated_with_the_cache_match_a_teacher_forced_pass():
    model = small_model()
    batch = robot_batch(model, batch=2)
    bb, cfg = model.backbone, model.cfg
    with torch.no_grad():
        prefix = bb.encode_prefix(batch['images'], batch['text_ids'], batch['text_mask'])
        codes, extended = bb.generate_latents(prefix, cfg.tokens.latent_tokens)
        ids = codes + cfg.latent_offset
        full = bb.forward_train(batch['images'], batch['text_ids'], batch['text_mask'], ids,
                                torch.ones_like(ids))
    assert codes.shape == (2, cfg.tokens.latent_tokens)
    assert ((codes >= 0) & (codes < cfg.tokens.latent_codebook)).all()
    # the greedy codes are the argmax of the teacher-forced logits over the latent range
    lat = full.logits[..., cfg.latent_offset:cfg.latent_offset + cfg.tokens.latent_codebook]
    assert torch.equal(lat.argmax(-1), codes)
    # and the cache holds the same keys/values as one pass over prefix + latent tokens
    for (k1, v1), (k2, v2) in zip(extended.kv, full.kv, strict=True):
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4)


def test_text_tokenizer_encodes_any_text_and_reserves_action_token_ids():
    cfg = get_config('tiny')
    tok = TextTokenizer.train(cfg.backbone.text_vocab, cfg.tokens.latent_codebook,
                              cfg.tokens.fast_vocab)
    ids, mask = tok.encode('stack the purple cube on the green cube', 24)
    assert len(ids) == 24 and sum(mask) < 12  # task words are few tokens each
    assert max(ids) < cfg.backbone.text_vocab
    assert tok.decode(tok.encode_text('Grüße, robot!')).strip() == 'Grüße, robot!'
    assert tok.tok.token_to_id('<lat_0>') == cfg.latent_offset == tok.latent_id(0)
    assert tok.tok.token_to_id('<fast_0>') == cfg.fast_offset == tok.fast_id(0)
    assert tok.tok.get_vocab_size() == cfg.vocab_size


@pytest.mark.parametrize('kind', ['qwen2_5_vl', 'smolvlm'])
def test_transformers_vlm_families_train_and_generate_latents(kind):
    cfg = family_config(kind)
    torch.manual_seed(0)
    model = VLA(cfg)
    batch = robot_batch(model, batch=2)
    losses = model(batch)
    assert set(losses) == {'flow', 'latent', 'fast', 'total'}
    losses['total'].backward()
    with torch.no_grad():
        prefix = model.backbone.encode_prefix(batch['images'], batch['text_ids'],
                                              batch['text_mask'])
        codes, ext = model.backbone.generate_latents(prefix, 8)
    assert codes.shape == (2, 8)
    assert ext.kv[0][0].shape[2] == prefix.kv[0][0].shape[2] + 8


def test_qwen_image_patches_match_the_processor_layout():
    """Patchify by hand = Qwen2VLImageProcessor's flat layout: a patch row is (C, T, p, p) of
    one merged-window position, windows in row-major order."""
    cfg = family_config('qwen2_5_vl')
    bb = build_backbone(cfg)
    img = torch.rand(1, 3, 56, 56)
    flat, grid = bb.patchify(img)
    assert grid.tolist() == [[1, 4, 4]] and flat.shape == (16, 3 * 2 * 14 * 14)
    norm = (img - bb.mean) / bb.std
    # second row of the flat layout = merge window (0, 0), inner position (0, 1): pixels
    # rows 0:14, cols 14:28, channel-major, repeated over the 2 temporal frames
    expect = norm[0, :, 0:14, 14:28][:, None].expand(3, 2, 14, 14).reshape(-1)
    torch.testing.assert_close(flat[1], expect)
    # third row: window (0, 0), inner (1, 0) -> rows 14:28, cols 0:14
    expect = norm[0, :, 14:28, 0:14][:, None].expand(3, 2, 14, 14).reshape(-1)
    torch.testing.assert_close(flat[2], expect)


def test_backbone_path_must_be_a_local_directory(tmp_path):
    cfg = family_config('qwen2_5_vl', **{'backbone.path': str(tmp_path / 'nowhere')})
    with pytest.raises(FileNotFoundError, match='backbone.path.*never downloaded'):
        build_backbone(cfg)


def test_paper_preset_shapes_on_the_meta_device():
    """Qwen2.5-VL-3B + 36 DiT blocks built without allocating memory; the expert maps the
    VLM's per-layer KV (2 KV heads x 128) to a (30, 20) velocity chunk."""
    cfg = get_config('paper')
    with torch.device('meta'):
        model = VLA(cfg)
    bb = model.backbone
    n_vlm = sum(p.numel() for p in bb.parameters())
    assert 3.5e9 < n_vlm < 4.0e9
    assert (bb.n_layers, bb.kv_heads, bb.head_dim, bb.hidden) == (36, 2, 128, 2048)
    assert len(model.expert.blocks) == 36
    block = model.expert.blocks[0]
    assert block.k_proj.in_features == 2 * 128 and block.k_proj.out_features == 2 * 64
    assert bb.lm_head.out_features == cfg.vocab_size == 151936 + 32 + 2048
    kv = [(torch.empty(2, 2, 700, 128, device='meta'),) * 2 for _ in range(36)]
    ctx = model.expert.context(kv, torch.ones(2, 700, dtype=torch.bool, device='meta'))
    v = model.expert(torch.empty(2, 20, device='meta'), torch.empty(2, 30, 20, device='meta'),
                     torch.empty(2, device='meta'), ctx)
    assert v.shape == (2, 30, 20)
    # the prefix of two 224 px cameras: 2 x (224 / 28)^2 = 128 image tokens (+ 4 markers)
    grid = cfg.image_size // (cfg.backbone.patch_size * cfg.backbone.spatial_merge)
    assert 2 * grid * grid == 128


def test_instruction_film_depends_on_word_order():
    """'red cube into the blue bowl' and 'blue cube into the red bowl' share a bag of words but
    must condition the vision tower differently."""
    model = wake(small_model())
    vision, tok = model.backbone.vision, model.tokenizer
    images = torch.rand(1, 2, 3, 64, 64)
    feats = []
    for text in ('put the red cube in the blue bowl', 'put the blue cube in the red bowl'):
        ids, mask = tok.encode(text, 12)
        with torch.no_grad():
            feats.append(vision(images, torch.tensor([ids]), torch.tensor([mask]))[1])
    assert not torch.allclose(feats[0], feats[1], atol=1e-4)


@pytest.mark.parametrize('kind', ['tiny', 'qwen2_5_vl', 'smolvlm'])
def test_backbone_loads_from_a_local_model_directory(kind, tmp_path):
    """save_pretrained -> `backbone.path` -> the same prefix readout (no hub involved)."""
    cfg = family_config(kind)
    torch.manual_seed(0)
    original = build_backbone(cfg)
    original.save_pretrained(tmp_path / 'vlm')
    loaded = build_backbone(dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, path=str(tmp_path / 'vlm'))))
    ids, mask = original.tokenizer.encode(INSTRUCTIONS[0], cfg.backbone.max_text_tokens)
    assert loaded.tokenizer.encode(INSTRUCTIONS[0], cfg.backbone.max_text_tokens)[0] == ids
    images = torch.rand(1, 2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        a, b = (bb.eval().encode_prefix(images, torch.tensor([ids]), torch.tensor([mask]))
                for bb in (original, loaded))
    torch.testing.assert_close(a.next_logits, b.next_logits)


def test_qwen_mrope_positions_match_transformers_get_rope_index():
    cfg = family_config('qwen2_5_vl')
    torch.manual_seed(0)
    bb = build_backbone(cfg)
    ids, mask = bb.tokenizer.encode(INSTRUCTIONS[1], cfg.backbone.max_text_tokens)
    text_ids, text_mask = torch.tensor([ids]), torch.tensor([mask])
    with torch.no_grad():
        ours = bb._prefix(torch.rand(1, 2, 3, 56, 56), text_ids, text_mask)
    n_img = 4  # (56 / 14 / 2)^2 merged tokens per camera
    block = [bb.vision_start_id] + [bb.image_token_id] * n_img + [bb.vision_end_id]
    full_ids = torch.cat([torch.tensor([block * 2]), text_ids], dim=1)
    full_mask = torch.cat([torch.ones(1, 2 * len(block), dtype=torch.long), text_mask], dim=1)
    ref, _ = bb.vlm.get_rope_index(full_ids, mm_token_type_ids=(full_ids == bb.image_token_id)
                                   .int(), image_grid_thw=torch.tensor([[1, 4, 4]] * 2),
                                   attention_mask=full_mask)
    real = full_mask[0].bool()
    assert torch.equal(ours.positions[:, 0, real], ref[:, 0, real])


def test_latent_decoding_follows_in_place_weight_updates():
    """The fused decode weights are cached; an optimiser-style in-place update must show."""
    model = small_model()
    batch = robot_batch(model, batch=1)
    bb, cfg = model.backbone, model.cfg
    args = (batch['images'], batch['text_ids'], batch['text_mask'])
    with torch.inference_mode():
        bb.generate_latents(bb.encode_prefix(*args), 2)
    with torch.no_grad():
        bb.decoder.layers[0].self_attn.q_proj.weight.mul_(3.0)
        bb.decoder.layers[1].mlp.up_proj.weight.add_(0.1)
    with torch.inference_mode():
        codes, ext = bb.generate_latents(bb.encode_prefix(*args), 2)
        full = bb.forward_train(*args, codes + cfg.latent_offset, torch.ones_like(codes))
    for (k1, v1), (k2, v2) in zip(ext.kv, full.kv, strict=True):
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-4)
