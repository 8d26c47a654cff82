"""The transformers VLM families behind the `Backbone` interface (backbone.py): Qwen2.5-VL (the
paper's VLM) and Idefics3/SmolVLM, built from config (random init) or loaded from a local
directory with `local_files_only=True`; nothing is ever fetched from the hub."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from iflybot_vla_policy.config import VLAConfig
from iflybot_vla_policy.model.backbone import (
    Backbone,
    _Inputs,
    _positions_1d,
    _pretrained_tokenizer,
)
from iflybot_vla_policy.model.text_tokenizer import TextTokenizer


def _from_local_dir(model_cls, cfg: VLAConfig, path: Path, vision_pairs) -> nn.Module:
    """A transformers VLM from a local directory in fp32, refused when its shapes differ from
    the config (config.yaml must describe what runs, and latent/FAST ids follow text_vocab) or
    when any weight is missing (transformers would silently leave it randomly initialised)."""
    model, info = model_cls.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                            attn_implementation='sdpa',
                                            output_loading_info=True)
    b, text = cfg.backbone, model.config.text_config
    pairs = [(f'text_config.{a}', getattr(text, a), key, want) for a, key, want in (
        ('hidden_size', 'backbone.hidden', b.hidden),
        ('num_hidden_layers', 'backbone.layers', b.layers),
        ('num_attention_heads', 'backbone.heads', b.heads),
        ('num_key_value_heads', 'backbone.kv_heads', b.kv_heads),
        ('intermediate_size', 'backbone.intermediate', b.intermediate))]
    # a release has text_vocab rows; a directory we saved also has the latent and FAST rows
    if text.vocab_size != cfg.vocab_size:
        pairs.append(('text_config.vocab_size', text.vocab_size, 'backbone.text_vocab',
                      b.text_vocab))
    for attr, have, key, want in pairs + vision_pairs(model.config):
        if have != want:
            raise ValueError(f"{path}/config.json: {attr} = {have} but config key '{key}' asks "
                             f'for {want}')
    missing = sorted(set(info['missing_keys']) | set(info['mismatched_keys']))
    if missing:
        raise ValueError(f"{path}: no weights for '{missing[0]}' ({len(missing)} tensors in "
                         f'all): not a {model_cls.__name__} checkpoint?')
    return model


def _template_tokenizer(cfg: VLAConfig) -> TextTokenizer:
    """Random-init VLMs (tests, shape checks) still need a text tokenizer: ours, in their range."""
    return TextTokenizer.train(cfg.backbone.text_vocab, cfg.tokens.latent_codebook,
                               cfg.tokens.fast_vocab)


class Qwen25VLBackbone(Backbone):
    """Qwen2.5-VL (the paper's VLM). Images are patchified by hand (the processor needs
    torchvision) and get 3-D mRoPE positions; the text model runs on our embeddings."""

    position_axes = 3                           # mRoPE: temporal, height, width
    MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics, as the processor
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, cfg: VLAConfig, tokenizer: TextTokenizer | None = None) -> None:
        super().__init__(cfg)
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        b = cfg.backbone
        if b.path:
            path = Path(b.path)
            model = _from_local_dir(Qwen2_5_VLForConditionalGeneration, cfg, path, lambda c: [
                ('vision_config.patch_size', c.vision_config.patch_size, 'backbone.patch_size',
                 b.patch_size),
                ('vision_config.spatial_merge_size', c.vision_config.spatial_merge_size,
                 'backbone.spatial_merge', b.spatial_merge)])
            self.tokenizer = tokenizer or _pretrained_tokenizer(cfg, path)
            model.resize_token_embeddings(cfg.vocab_size)   # + latent and FAST rows
        else:
            top = b.text_vocab - 1  # placeholder ids at the top of the text range (unused ids)
            mrope = [b.head_dim // 8, b.head_dim * 3 // 16, b.head_dim * 3 // 16]
            mcfg = Qwen2_5_VLConfig(
                text_config=dict(
                    vocab_size=cfg.vocab_size, hidden_size=b.hidden, num_hidden_layers=b.layers,
                    num_attention_heads=b.heads, num_key_value_heads=b.kv_heads,
                    intermediate_size=b.intermediate, max_position_embeddings=32768,
                    rope_parameters={'rope_type': 'default', 'rope_theta': b.rope_theta,
                                     'mrope_section': mrope},
                    tie_word_embeddings=b.tie_embeddings, bos_token_id=None,
                    eos_token_id=None),
                vision_config=dict(
                    depth=b.vision_depth, hidden_size=b.vision_hidden, num_heads=b.vision_heads,
                    intermediate_size=b.vision_intermediate, patch_size=b.patch_size,
                    spatial_merge_size=b.spatial_merge, temporal_patch_size=2,
                    out_hidden_size=b.hidden, window_size=112,
                    fullatt_block_indexes=list(range(b.vision_depth)) if b.vision_depth < 8
                    else [7, 15, 23, 31][:b.vision_depth // 8]),
                image_token_id=top, vision_start_token_id=top - 2, vision_end_token_id=top - 1,
                video_token_id=top - 3, tie_word_embeddings=b.tie_embeddings,
                bos_token_id=None, eos_token_id=None)
            mcfg._attn_implementation = 'sdpa'
            model = Qwen2_5_VLForConditionalGeneration(mcfg)
            self.tokenizer = tokenizer or _template_tokenizer(cfg)
        object.__setattr__(self, 'hf', model)  # for save_pretrained; not a second submodule
        self.vlm = model.model
        self.decoder, self.lm_head = model.model.language_model, model.lm_head
        mc = model.config
        self.image_token_id = mc.image_token_id
        self.vision_start_id = mc.vision_start_token_id
        self.vision_end_id = mc.vision_end_token_id
        self.patch = mc.vision_config.patch_size
        self.merge = mc.vision_config.spatial_merge_size
        self.temporal = mc.vision_config.temporal_patch_size
        self.register_buffer('mean', torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def patchify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [0, 1] -> flat patches (N * gh * gw, 3 * T * p * p), grid_thw (N, 3),
        in the layout of Qwen2VLImageProcessor (a still image repeated over T frames)."""
        n, c, h, w = images.shape
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        x = ((images - self.mean) / self.std)[:, None].expand(n, t, c, h, w)
        x = x.reshape(n, 1, t, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        flat = x.reshape(n * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]] * n, device=images.device)
        return flat, grid

    def prompt_ids(self, text_ids: torch.Tensor, n_cam: int, n_img: int) -> torch.Tensor:
        """(B, T) encoded instructions -> (B, S) the token sequence the chat template and the
        processor make: [prompt head][<|vision_start|> n_img x <|image_pad|> <|vision_end|>]
        per camera [instruction + prompt tail]."""
        b = text_ids.shape[0]
        block = [self.vision_start_id] + [self.image_token_id] * n_img + [self.vision_end_id]
        head = torch.tensor(self.tokenizer.prompt_head + block * n_cam, dtype=torch.long,
                            device=text_ids.device).expand(b, -1)
        return torch.cat([head, text_ids], dim=1)

    def _prefix(self, images: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor) -> _Inputs:
        b, n_cam, _, h, w = images.shape
        flat, grid = self.patchify(images.flatten(0, 1).to(self.mean.dtype))
        feats = self.vlm.get_image_features(flat.to(self.lm_head.weight.dtype),
                                            image_grid_thw=grid).pooler_output
        feats = torch.cat(list(feats), 0).view(b, n_cam, -1, self.hidden)       # (B, cam, n, D)
        n_img = feats.shape[2]
        gh, gw = h // self.patch // self.merge, w // self.patch // self.merge
        ids = self.prompt_ids(text_ids, n_cam, n_img)
        n_head = len(self.tokenizer.prompt_head)
        embeds = self.embed(ids)
        is_img = ids == self.image_token_id
        # under autocast the vision tower returns bf16 while the embedding table stays fp32
        embeds = embeds.masked_scatter(is_img[..., None],
                                       feats.reshape(-1, self.hidden).to(embeds.dtype))
        mask = torch.cat([torch.ones_like(ids[:, :ids.shape[1] - text_ids.shape[1]]),
                          text_mask.long()], dim=1)
        # mRoPE: the prompt head 1-D, per camera [start][t=0, row, col grid][end], text 1-D
        pos = [torch.arange(n_head, device=ids.device).expand(3, -1)]
        cur = n_head
        rows = torch.arange(gh, device=ids.device).repeat_interleave(gw)
        cols = torch.arange(gw, device=ids.device).repeat(gh)
        for _ in range(n_cam):
            pos.append(torch.full((3, 1), cur, device=ids.device))
            cur += 1
            pos.append(torch.stack([torch.zeros_like(rows), rows, cols]) + cur)
            cur += max(gh, gw)
            pos.append(torch.full((3, 1), cur, device=ids.device))
            cur += 1
        img_pos = torch.cat(pos, dim=1)[:, None].expand(3, b, -1)                 # (3, B, Si)
        txt_pos = cur + (text_mask.long().cumsum(-1) - 1).clamp(min=0)            # (B, T)
        positions = torch.cat([img_pos, txt_pos[None].expand(3, -1, -1)], dim=-1)
        features = feats.flatten(1, 2) if self.cfg.expert.direct_vision else None
        summary = feats.mean(dim=(1, 2)) if self.cfg.expert.direct_vision else None
        return _Inputs(embeds, mask, positions, features, summary)


class SmolVLMBackbone(Backbone):
    """SmolVLM / Idefics3: SigLIP vision encoder + pixel-shuffle connector + Llama decoder."""

    lean_decode = True

    def __init__(self, cfg: VLAConfig, tokenizer: TextTokenizer | None = None) -> None:
        super().__init__(cfg)
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        b = cfg.backbone
        if b.path:
            path = Path(b.path)
            model = _from_local_dir(Idefics3ForConditionalGeneration, cfg, path, lambda c: [
                ('vision_config.patch_size', c.vision_config.patch_size, 'backbone.patch_size',
                 b.patch_size),
                ('scale_factor', c.scale_factor, 'backbone.spatial_merge', b.spatial_merge)])
            self.tokenizer = tokenizer or _pretrained_tokenizer(cfg, path)
            model.resize_token_embeddings(cfg.vocab_size)   # + latent and FAST rows
        else:
            mcfg = Idefics3Config(
                text_config=dict(
                    model_type='llama', vocab_size=cfg.vocab_size, hidden_size=b.hidden,
                    num_hidden_layers=b.layers, num_attention_heads=b.heads,
                    num_key_value_heads=b.kv_heads, head_dim=b.head_dim,
                    intermediate_size=b.intermediate, max_position_embeddings=8192,
                    rope_parameters={'rope_type': 'default', 'rope_theta': b.rope_theta},
                    tie_word_embeddings=b.tie_embeddings),
                vision_config=dict(
                    hidden_size=b.vision_hidden, num_hidden_layers=b.vision_depth,
                    num_attention_heads=b.vision_heads, intermediate_size=b.vision_intermediate,
                    patch_size=b.patch_size, image_size=cfg.image_size),
                scale_factor=b.spatial_merge, image_token_id=b.text_vocab - 1,
                tie_word_embeddings=b.tie_embeddings)
            mcfg._attn_implementation = 'sdpa'
            model = Idefics3ForConditionalGeneration(mcfg)
            self.tokenizer = tokenizer or _template_tokenizer(cfg)
        object.__setattr__(self, 'hf', model)  # for save_pretrained; not a second submodule
        self.vlm = model.model
        self.decoder, self.lm_head = model.model.text_model, model.lm_head
        self.lean_decode = self.decoder.config.hidden_act == 'silu'
        self.image_token_id = model.config.image_token_id

    def _prefix(self, images: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor) -> _Inputs:
        b, n_cam = images.shape[:2]
        x = images.flatten(0, 1).to(self.lm_head.weight.dtype) * 2 - 1         # SigLIP: [-1, 1]
        vis = self.vlm.vision_model(pixel_values=x).last_hidden_state
        feats = self.vlm.connector(vis).view(b, n_cam, -1, self.hidden)         # (B, cam, n, D)
        n_img = feats.shape[2]
        head = torch.tensor(self.tokenizer.prompt_head, dtype=torch.long,
                            device=text_ids.device).expand(b, -1)
        text = self.embed(torch.cat([head, text_ids], dim=1))
        n_head = head.shape[1]
        # [chat template head][image tokens][instruction + template tail]
        embeds = torch.cat([text[:, :n_head], feats.flatten(1, 2).to(text.dtype),
                            text[:, n_head:]], dim=1)
        mask = torch.cat([torch.ones(b, n_head + n_cam * n_img, dtype=torch.long,
                                     device=text_ids.device), text_mask.long()], dim=1)
        features = feats.flatten(1, 2) if self.cfg.expert.direct_vision else None
        summary = feats.mean(dim=(1, 2)) if self.cfg.expert.direct_vision else None
        return _Inputs(embeds, mask, _positions_1d(mask), features, summary)
