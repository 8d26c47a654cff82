"""Small configs, observations and batches shared by the policy-core tests (not a test file)."""
from __future__ import annotations

import numpy as np
import pytest
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

# Small random-init configs of the two transformers VLM families: the paper preset's code path
# (a Qwen2.5-VL or Idefics3/SmolVLM built from config) at sizes of seconds per test.
FAMILY = {
    'backbone.hidden': 64, 'backbone.layers': 2, 'backbone.heads': 2, 'backbone.kv_heads': 1,
    'backbone.head_dim': 32, 'backbone.intermediate': 128, 'backbone.text_vocab': 1024,
    'backbone.vision_hidden': 32, 'backbone.vision_depth': 1, 'backbone.vision_heads': 2,
    'backbone.vision_intermediate': 64, 'backbone.max_text_tokens': 12, 'expert.width': 64,
    'expert.heads': 2, 'tokens.fast_vocab': 64, 'action.horizon': 8,
}
# per family: its image size and patch (Qwen2.5-VL: 4 merged tokens per camera at 56 px)
FAMILY_IMAGES = {
    'qwen2_5_vl': {'image_size': 56, 'backbone.patch_size': 14},
    'smolvlm': {'image_size': 64, 'backbone.patch_size': 16},
}
# every loss on: grounding reads the direct vision path, which the paper preset turns off
ALL_LOSSES = {'expert.direct_vision': True, 'loss.grounding_weight': 1.0}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state that refuses an Accelerator of another mixed
    precision once set (a bf16 trainer test after fp32 ones, or the reverse): a test module
    that imports this fixture starts and ends each test with a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def small_config(**overrides) -> VLAConfig:
    return get_config('tiny', {**SMALL, **overrides})


def family_config(kind: str, **overrides) -> VLAConfig:
    """The small config of a backbone family: 'tiny' (SMALL), 'qwen2_5_vl' or 'smolvlm'
    (the paper preset with FAMILY sizes); dotted-key overrides on top."""
    if kind == 'tiny':
        return small_config(**overrides)
    return get_config('paper', {**FAMILY, **FAMILY_IMAGES[kind], 'backbone.kind': kind,
                                **overrides})


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


def mixed_batch(model: VLA) -> dict[str, torch.Tensor]:
    """Two robot samples with grounding targets and one VQA sample: every loss kind, with fixed
    flow noise and times (no RNG in the losses)."""
    batch = robot_batch(model, batch=3)
    answer = (model.tokenizer.encode_text('the red cube') + [-100] * 3)[:3]
    batch['answer_ids'] = torch.tensor([[-100] * 3, [-100] * 3, answer])
    batch['is_robot'] = torch.tensor([True, True, False])
    batch['grounding'] = torch.rand(3, 2, 3, generator=torch.Generator().manual_seed(1))
    batch['grounding_mask'] = torch.tensor([True, True, False])
    gen = torch.Generator().manual_seed(2)
    batch['noise'] = torch.randn(batch['actions'].shape, generator=gen)
    batch['time'] = torch.tensor([0.3, 0.7, 0.5])
    return batch


class Rows(torch.utils.data.Dataset):
    """The trainer's dataset protocol over one fixed batch: items are row indices, `collate`
    stacks the rows of a list of them (in index order)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch['images'])

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {k: v[sorted(rows)] for k, v in self.batch.items()}
