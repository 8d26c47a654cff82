"""A local Qwen2.5-VL directory in Hugging Face's own format, end to end (config/model/
paper_local.yaml): a small random Qwen2.5-VL written by transformers' `save_pretrained` (sharded
safetensors, config.json, a locally trained tokenizer with Qwen's special tokens at Qwen's
relative ids, the Qwen2.5-VL chat template) stands in for the 3B download.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _vla_fixtures import robot_batch
from iflybot_vla_policy.config import VLAConfig, get_config
from iflybot_vla_policy.model.backbone import build_backbone
from iflybot_vla_policy.model.text_tokenizer import template_corpus
from iflybot_vla_policy.model.vla import VLA
from iflybot_vla_policy.policy import Policy

# Qwen2.5-VL's added tokens, in its order (151643.. in the real vocabulary)
QWEN_SPECIAL = (
    '<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>',
    '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>',
    '<|vision_end|>', '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>', '<tool_call>',
    '</tool_call>', '<|fim_prefix|>', '<|fim_middle|>', '<|fim_suffix|>', '<|fim_pad|>',
    '<|repo_name|>', '<|file_sep|>')
# Qwen2.5-VL-*-Instruct's chat template (chat_template.json of the release)
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT_VOCAB = 640        # embedding rows > tokenizer size, as 151936 > 151665 in the release
SIZE, N_IMG = 56, 4     # 56 px, patch 14, merge 2: 4 image tokens per camera
INSTRUCTION = 'pick up the red cube and place it in the blue bowl'


def _write_qwen_dir(d: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(template_corpus(3000), trainer=trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens(list(QWEN_SPECIAL))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<|im_end|>',
                            pad_token='<|endoftext|>',
                            chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(d)
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIAL}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=TEXT_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=128, max_position_embeddings=4096,
            rope_parameters={'rope_type': 'default', 'rope_theta': 1e6,
                             'mrope_section': [4, 6, 6]},
            tie_word_embeddings=True, bos_token_id=ids['<|endoftext|>'],
            eos_token_id=ids['<|im_end|>']),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=64, window_size=112, fullatt_block_indexes=[0]),
        image_token_id=ids['<|image_pad|>'], video_token_id=ids['<|video_pad|>'],
        vision_start_token_id=ids['<|vision_start|>'],
        vision_end_token_id=ids['<|vision_end|>'], tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(d, max_shard_size='200KB')


def _as_published(src: Path, d: Path) -> None:
    """The release's layout: a transformers 4.x config.json (text fields at the top level,
    `rope_scaling: {type: mrope}`) and the chat template inside tokenizer_config.json."""
    shutil.copytree(src, d)
    c = json.loads((d / 'config.json').read_text())
    t, v = c.pop('text_config'), c['vision_config']
    legacy = {k: t[k] for k in (
        'bos_token_id', 'eos_token_id', 'hidden_act', 'hidden_size', 'intermediate_size',
        'max_position_embeddings', 'num_attention_heads', 'num_hidden_layers',
        'num_key_value_heads', 'rms_norm_eps', 'tie_word_embeddings', 'vocab_size')}
    legacy.update(
        architectures=c['architectures'], model_type='qwen2_5_vl', torch_dtype='bfloat16',
        transformers_version='4.41.2', rope_theta=t['rope_parameters']['rope_theta'],
        rope_scaling={'type': 'mrope', 'mrope_section': t['rope_parameters']['mrope_section']},
        **{k: c[k] for k in ('image_token_id', 'video_token_id', 'vision_start_token_id',
                             'vision_end_token_id')},
        vision_config={**{k: v[k] for k in (
            'depth', 'hidden_act', 'hidden_size', 'intermediate_size', 'num_heads',
            'out_hidden_size', 'patch_size', 'spatial_merge_size', 'temporal_patch_size',
            'window_size', 'fullatt_block_indexes', 'tokens_per_second')}, 'in_chans': 3})
    (d / 'config.json').write_text(json.dumps(legacy, indent=2))
    tok_cfg = json.loads((d / 'tokenizer_config.json').read_text())
    tok_cfg['chat_template'] = (d / 'chat_template.jinja').read_text()
    (d / 'tokenizer_config.json').write_text(json.dumps(tok_cfg))
    (d / 'chat_template.jinja').unlink()


@pytest.fixture(scope='module')
def qwen_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('qwen')
    _write_qwen_dir(root / 'saved')
    _as_published(root / 'saved', root / 'published')
    return {'saved': root / 'saved', 'published': root / 'published'}


def _config(path: Path, **overrides) -> VLAConfig:
    """paper_local.yaml with the small directory's shapes."""
    return get_config('paper', {
        'backbone.path': str(path), 'backbone.hidden': 64, 'backbone.layers': 2,
        'backbone.heads': 2, 'backbone.kv_heads': 1, 'backbone.head_dim': 32,
        'backbone.intermediate': 128, 'backbone.text_vocab': TEXT_VOCAB,
        'backbone.max_text_tokens': 24, 'image_size': SIZE, 'expert.width': 64,
        'expert.heads': 2, 'tokens.fast_vocab': 64, 'action.horizon': 8, **overrides})


def _reference(d: Path):
    """The transformers model and tokenizer, loaded the way their own docs do."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(d)


def _processor_ids(tokenizer, instruction: str, n_cam: int) -> list[int]:
    """What Qwen2_5_VLProcessor feeds the model: the chat template with one image entry per
    camera, each <|image_pad|> expanded to the image's merged patch count."""
    content = [{'type': 'image'}] * n_cam + [{'type': 'text', 'text': instruction}]
    text = tokenizer.apply_chat_template([{'role': 'user', 'content': content}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text.replace('<|image_pad|>', '<|image_pad|>' * N_IMG))['input_ids']


def test_the_directory_is_in_hugging_faces_sharded_format(qwen_dirs):
    d = qwen_dirs['saved']
    shards = set(json.loads((d / 'model.safetensors.index.json').read_text())['weight_map']
                 .values())
    assert len(shards) > 1 and all((d / s).is_file() for s in shards)
    assert {'config.json', 'tokenizer.json', 'tokenizer_config.json',
            'chat_template.jinja'} <= {p.name for p in d.iterdir()}


@pytest.mark.parametrize('layout', ['saved', 'published'])
def test_weights_land_where_transformers_puts_them(qwen_dirs, layout):
    """Our prefix pass (hand patchify, our mRoPE positions, our prompt layout) gives the
    transformers model's own logits at every real position, on the processor's input."""
    torch.manual_seed(0)
    bb = build_backbone(_config(qwen_dirs[layout])).eval()
    ref, hf_tok = _reference(qwen_dirs['saved'])
    images = torch.rand(1, 2, 3, SIZE, SIZE)
    ids, mask = bb.tokenizer.encode(INSTRUCTION, 24)
    text_ids, text_mask = torch.tensor([ids]), torch.tensor([mask])
    prompt = _processor_ids(hf_tok, INSTRUCTION, 2)
    real = torch.cat([torch.ones(len(prompt) - sum(mask), dtype=torch.bool),
                      text_mask[0].bool()])
    assert bb.prompt_ids(text_ids, 2, N_IMG)[0, real].tolist() == prompt
    flat, grid = bb.patchify(images.flatten(0, 1))
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = ref(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       pixel_values=flat, image_grid_thw=grid,
                       mm_token_type_ids=(input_ids == bb.image_token_id).int()).logits[0]
        p = bb._prefix(images, text_ids, text_mask)
        hidden = bb._run(p.embeds, p.mask, p.positions).last_hidden_state
        ours = bb.lm_head(hidden)[0, real, :TEXT_VOCAB]
        next_logits = bb.encode_prefix(images, text_ids, text_mask).next_logits
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(next_logits[0, :TEXT_VOCAB], expected[-1], atol=2e-5, rtol=1e-4)


def test_vocabulary_grows_by_latent_and_fast_tokens_keeping_the_original_rows(qwen_dirs):
    cfg = _config(qwen_dirs['saved'])
    bb = build_backbone(cfg)
    ref, hf_tok = _reference(qwen_dirs['saved'])
    emb = bb.decoder.get_input_embeddings().weight.detach()
    original = ref.model.language_model.embed_tokens.weight.detach()
    assert emb.shape == (TEXT_VOCAB + 32 + 64, 64) == (cfg.vocab_size, bb.hidden)
    assert torch.equal(emb[:TEXT_VOCAB], original)
    assert bb.lm_head.weight.data_ptr() == emb.data_ptr()          # still tied, as in 3B
    new = emb[TEXT_VOCAB:]
    assert bool(new.isfinite().all()) and float(new.std(0).mean()) > 0
    # the new rows start near the old embeddings (mean resizing), not at a random scale
    assert float((new.mean(0) - original.mean(0)).norm()) < float(original.std(0).norm())
    tok = bb.tokenizer
    for text in (INSTRUCTION, 'Grüße, robot!', '<|im_start|>user\nwhere is it?<|im_end|>'):
        assert tok.encode_text(text) == hf_tok(text)['input_ids']
    assert tok.tok.token_to_id('<|image_pad|>') == bb.image_token_id
    assert tok.pad_id == tok.tok.token_to_id('<|endoftext|>')
    assert tok.tok.token_to_id('<lat_0>') == cfg.latent_offset == TEXT_VOCAB
    assert tok.tok.token_to_id('<fast_0>') == cfg.fast_offset == TEXT_VOCAB + 32
    assert tok.tok.get_vocab_size() == cfg.vocab_size


def test_instruction_goes_through_the_chat_template(qwen_dirs):
    bb = build_backbone(_config(qwen_dirs['saved']))
    tok = bb.tokenizer
    def text(ids: list[int]) -> str:
        return tok.tok.decode(ids, skip_special_tokens=False)

    assert text(tok.prompt_head) == ('<|im_start|>system\nYou are a helpful assistant.'
                                   '<|im_end|>\n<|im_start|>user\n')
    assert text(tok.prompt_tail) == '<|im_end|>\n<|im_start|>assistant\n'
    # a long instruction is cut, the assistant turn that the action tokens follow is not
    ids, mask = tok.encode(INSTRUCTION * 4, 24)
    assert sum(mask) == 24 and ids[-len(tok.prompt_tail):] == tok.prompt_tail
    with pytest.raises(ValueError, match='max_text_tokens = 4 leaves no room'):
        tok.encode(INSTRUCTION, 4)


def test_fine_tuned_policy_saves_and_reloads_with_identical_outputs(qwen_dirs, tmp_path):
    cfg = _config(qwen_dirs['saved'])
    torch.manual_seed(0)
    model = VLA(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    batch = robot_batch(model, batch=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        losses = model(batch)
        assert set(losses) == {'flow', 'latent', 'fast', 'total'}
        opt.zero_grad()
        losses['total'].backward()
        opt.step()
    tuned = Policy(cfg, model.eval())
    d = tuned.save(tmp_path / 'policy')
    assert (d / 'chat_template.jinja').read_text() == QWEN_CHAT_TEMPLATE
    loaded = Policy.from_checkpoint(d)
    state = loaded.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not torch.equal(state['backbone.decoder.layers.0.mlp.up_proj.weight'],
                           base['backbone.decoder.layers.0.mlp.up_proj.weight'])
    assert loaded.tokenizer.encode(INSTRUCTION, 24) == tuned.tokenizer.encode(INSTRUCTION, 24)
    assert loaded.tokenizer.prompt_head == tuned.tokenizer.prompt_head
    rng = np.random.default_rng(0)
    obs = {'images': {c: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                      for c in cfg.cameras},
           'state': np.r_[rng.uniform(-1, 1, 7), 0.04].astype(np.float32),
           'instruction': INSTRUCTION}
    a, b = tuned.infer(obs, seed=3), loaded.infer(obs, seed=3)
    np.testing.assert_array_equal(a['latent_tokens'], b['latent_tokens'])
    np.testing.assert_array_equal(a['actions'], b['actions'])


def test_a_config_that_does_not_describe_the_directory_names_the_key(qwen_dirs):
    with pytest.raises(ValueError, match=r"hidden_size = 64 but config key 'backbone.hidden'"):
        build_backbone(_config(qwen_dirs['saved'], **{'backbone.hidden': 128}))
    with pytest.raises(ValueError, match=r"vocab_size = 640 but config key 'backbone.text_vo"):
        build_backbone(_config(qwen_dirs['saved'], **{'backbone.text_vocab': 1024}))


def test_weights_the_model_does_not_know_are_refused_not_left_random(qwen_dirs, tmp_path):
    """A checkpoint whose vision weights are named for another layout: transformers would only
    warn and keep the random initialisation of the whole vision tower."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / 'renamed'
    shutil.copytree(qwen_dirs['saved'], d)
    index = json.loads((d / 'model.safetensors.index.json').read_text())
    for shard in set(index['weight_map'].values()):
        tensors = load_file(str(d / shard))
        save_file({k.replace('visual.', 'vision_tower.'): v for k, v in tensors.items()},
                  str(d / shard), metadata={'format': 'pt'})
    index['weight_map'] = {k.replace('visual.', 'vision_tower.'): v
                           for k, v in index['weight_map'].items()}
    (d / 'model.safetensors.index.json').write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"no weights for 'model\.visual\..*not a Qwen2_5_VL"):
        build_backbone(dataclasses.replace(_config(d)))
