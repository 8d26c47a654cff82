"""The tiny backbone (`backbone.kind: tiny`): a transformers Qwen2 decoder built from config,
fed by our conv vision tower; from config (random init) or a local directory that `save_local`
wrote. It runs on CPU in tests and trains on 2 cores."""
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
from iflybot_vla_policy.model.vision import ConvVisionTower

VISION_FILE = 'vision.safetensors'


def _check_loaded(loaded, expected, path: Path) -> None:
    """A local tiny LM must have the shapes the config asks for; name the first mismatch."""
    pairs = (('hidden_size', 'backbone.hidden'), ('num_hidden_layers', 'backbone.layers'),
             ('num_attention_heads', 'backbone.heads'),
             ('num_key_value_heads', 'backbone.kv_heads'),
             ('intermediate_size', 'backbone.intermediate'), ('vocab_size', 'vocab size'))
    for attr, key in pairs:
        if getattr(loaded, attr) != getattr(expected, attr):
            raise ValueError(f'{path}/config.json: {attr} = {getattr(loaded, attr)} but config '
                             f"key '{key}' asks for {getattr(expected, attr)}")


def _load_extra(module: nn.Module, file: Path) -> None:
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f'local model directory is missing {file}')
    state = load_file(str(file))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise ValueError(f"{file}: {'missing' if missing else 'unexpected'} key '{key}'")


class TinyBackbone(Backbone):
    """Qwen2 decoder LM built from config; image tokens come from `ConvVisionTower`."""

    lean_decode = True

    def __init__(self, cfg: VLAConfig, tokenizer: TextTokenizer | None = None) -> None:
        super().__init__(cfg)
        from transformers import Qwen2Config, Qwen2ForCausalLM

        b = cfg.backbone
        path = Path(b.path) if b.path else None
        if tokenizer is None and path is not None:
            tokenizer = _pretrained_tokenizer(cfg, path)
        self.tokenizer = tokenizer or TextTokenizer.train(
            b.text_vocab, cfg.tokens.latent_codebook, cfg.tokens.fast_vocab)
        lm_cfg = Qwen2Config(
            vocab_size=cfg.vocab_size, hidden_size=b.hidden, num_hidden_layers=b.layers,
            num_attention_heads=b.heads, num_key_value_heads=b.kv_heads, head_dim=b.head_dim,
            intermediate_size=b.intermediate, max_position_embeddings=2048,
            rope_parameters={'rope_type': 'default', 'rope_theta': b.rope_theta},
            tie_word_embeddings=b.tie_embeddings, pad_token_id=self.tokenizer.pad_id)
        lm_cfg._attn_implementation = 'sdpa'
        if path is not None:
            lm = Qwen2ForCausalLM.from_pretrained(path, local_files_only=True,
                                                  attn_implementation='sdpa')
            _check_loaded(lm.config, lm_cfg, path)
        else:
            lm = Qwen2ForCausalLM(lm_cfg)
        object.__setattr__(self, 'hf', lm)  # for save_pretrained; not a second submodule
        self.decoder, self.lm_head = lm.model, lm.lm_head
        self.lean_decode = lm_cfg.hidden_act == 'silu'
        self.vision = ConvVisionTower(b.vision, cfg.image_size, len(cfg.cameras), b.hidden,
                                      b.text_vocab)
        if path is not None:
            _load_extra(self.vision, path / VISION_FILE)

    def checkpointed_modules(self) -> list[nn.Module]:
        return [*super().checkpointed_modules(), *self.vision.stages]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        super().set_activation_checkpointing(enabled)
        self.vision.checkpointing = enabled

    def save_pretrained(self, directory: str | Path) -> Path:
        """A local model directory that `backbone.path` loads: the Qwen2 LM in transformers
        format, the conv tower and the tokenizer."""
        from safetensors.torch import save_file

        d = super().save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.vision.state_dict().items()},
                  str(d / VISION_FILE))
        return d

    def _prefix(self, images: torch.Tensor, text_ids: torch.Tensor,
                text_mask: torch.Tensor) -> _Inputs:
        tokens, summary = self.vision(images, text_ids, text_mask)   # (B, N, D), (B, D)
        embeds = torch.cat([tokens.to(self.lm_head.weight.dtype), self.embed(text_ids)], dim=1)
        mask = torch.cat([torch.ones(tokens.shape[:2], dtype=torch.long,
                                     device=text_mask.device), text_mask.long()], dim=1)
        return _Inputs(embeds, mask, _positions_1d(mask), tokens, summary)

    def _prefix_fast(self, images: torch.Tensor, text_ids: torch.Tensor,
                     text_mask: torch.Tensor) -> _Inputs:
        tokens, summary = self.vision.forward_fast(images, text_ids, text_mask)
        embeds = torch.cat([tokens.to(self.lm_head.weight.dtype), self.embed(text_ids)], dim=1)
        mask = torch.cat([torch.ones(tokens.shape[:2], dtype=torch.long,
                                     device=text_mask.device), text_mask.long()], dim=1)
        return _Inputs(embeds, mask, _positions_1d(mask), tokens, summary)
