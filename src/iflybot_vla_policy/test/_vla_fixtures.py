"""Small configs, observations and batches shared by the policy-core tests (not a test file)."""
from __future__ import annotations

import numpy as np
import torch

from iflybot_vla_policy.config import VLAConfig, get_config
from iflybot_vla_policy.model.vla import VLA

# A shrunken tiny preset: same architecture, sizes that keep each test to seconds on 2 cores.
SMALL = {
    'image_size': 64, 'backbone.hidden': 64, 'backbone.layers': 2, 'backbone.heads': 2,
    'backbone.kv_heads': 1, 'backbone.head_dim': 32, 'backbone.intermediate': 128,
    'backbone.max_text_tokens': 12, 'backbone.vision.channels': [16, 32, 32, 64],
    'backbone.vision.token_grid': 4, 'expert.width': 64, 'expert.heads': 2,
    'tokens.fast_vocab': 64, 'action.horizon': 8,
}
INSTRUCTIONS = ('pick up the red cube and place it in the blue bowl', 'open the drawer')


def small_config(**overrides) -> VLAConfig:
    return get_config('tiny', {**SMALL, **overrides})


def wake(model: VLA, std: float = 0.05, seed: int = 0) -> VLA:
    """Give zero-initialised tensors (adaLN-Zero gates, FiLM heads) small random values, so the
    expert's output really depends on the VLM context, as in any trained model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def observation(cfg: VLAConfig, seed: int = 0, size: tuple[int, int] = (48, 64),
                instruction: str = INSTRUCTIONS[0]) -> dict:
    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for c in cfg.cameras}
    state = np.r_[rng.uniform(-1, 1, 7), 0.04].astype(np.float32)
    return {'images': images, 'state': state, 'instruction': instruction}


def robot_batch(model: VLA, batch: int = 2, fast_len: int = 6, seed: int = 0) -> dict:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    text = [model.tokenizer.encode(INSTRUCTIONS[i % 2], cfg.backbone.max_text_tokens)
            for i in range(batch)]
    fast = torch.randint(0, cfg.tokens.fast_vocab, (batch, fast_len), generator=gen)
    fast[0, fast_len - 2:] = -100  # ragged FAST lengths, padded with -100
    return {
        'images': torch.rand(batch, len(cfg.cameras), 3, cfg.image_size, cfg.image_size,
                             generator=gen),
        'text_ids': torch.tensor([t[0] for t in text]),
        'text_mask': torch.tensor([t[1] for t in text]),
        'state': torch.randn(batch, cfg.action.state_dim, generator=gen),
        'actions': torch.randn(batch, cfg.action.horizon, cfg.action.action_dim, generator=gen),
        'latent_tokens': torch.randint(0, cfg.tokens.latent_codebook,
                                       (batch, cfg.tokens.latent_tokens), generator=gen),
        'fast_tokens': fast,
    }


def small_model(seed: int = 0, **overrides) -> VLA:
    torch.manual_seed(seed)
    return VLA(small_config(**overrides))
