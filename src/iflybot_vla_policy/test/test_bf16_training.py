"""bf16 mixed precision: one training step of every backbone family through the trainer's
autocast (`trainer.mixed_precision: bf16`, what the paper preset's config sets), every loss on.

Before this test the Qwen2.5-VL family failed at the first step (`masked_scatter: expected self
and source to have same dtypes`): its vision tower returns bf16 under autocast while the text
embedding table stays fp32. Small sizes keep a family to about a second on 2 CPU cores.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from _vla_fixtures import (
    ALL_LOSSES,
    Rows,
    family_config,
    fresh_accelerator_state,  # noqa: F401 (autouse)
    mixed_batch,
)
from iflybot_vla_policy.config import VLAConfig
from iflybot_vla_policy.model.vla import VLA
from iflybot_vla_policy.training.config import OptimConfig, TrainerConfig
from iflybot_vla_policy.training.trainer import Trainer
from iflybot_vla_policy.training.vla_stage import LOSSES, VLAObjective

# the family configs with smaller images (SmolVLM: 16 patches of 8 px, Qwen2.5-VL: its 56 px)
SMALLER_IMAGES = {'tiny': {'image_size': 32, 'backbone.vision.token_grid': 2}, 'qwen2_5_vl': {},
                  'smolvlm': {'image_size': 32, 'backbone.patch_size': 8}}


def _config(kind: str) -> VLAConfig:
    return family_config(kind, **ALL_LOSSES, **SMALLER_IMAGES[kind])


@pytest.mark.parametrize('kind', ['tiny', 'qwen2_5_vl', 'smolvlm'])
def test_one_bf16_training_step_of_every_backbone_family(kind, tmp_path):
    torch.manual_seed(0)
    model = VLA(_config(kind))
    batch = mixed_batch(model)
    with torch.no_grad():
        reference = model(batch)                                   # fp32, the same weights
    assert set(reference) == {'flow', 'latent', 'fast', 'text', 'ground', 'total'}

    linear_dtypes: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: linear_dtypes.add(out.dtype))
    data = Rows(batch)
    cfg = TrainerConfig(steps=1, batch_size=3, checkpoint_every=1, progress=False, cpu=True,
                        mixed_precision='bf16', optim=OptimConfig(lr=1e-3, warmup_steps=0))
    trainer = Trainer(VLAObjective(model), data, cfg, tmp_path, collate_fn=data.collate)
    grads: dict[nn.Parameter, torch.Tensor | None] = {}

    def before_step(opt: torch.optim.Optimizer, *_: object) -> None:
        grads.update({p: p.grad for group in opt.param_groups for p in group['params']})

    trainer.optimizer.optimizer.register_step_pre_hook(before_step)
    history = trainer.fit().history

    # the trainer's autocast reached every projection: vision, language model and expert
    assert linear_dtypes == {torch.bfloat16}
    row = history[0]
    for name in LOSSES:
        assert 0 < row[name] < 20, name
        assert row[name] == pytest.approx(float(reference[name]), rel=0.03, abs=1e-3), name
    # master weights and gradients stay fp32 and finite; every part of the model learns
    assert all(p.dtype == torch.float32 and bool(p.isfinite().all())
               for p in model.parameters())
    assert all(g is None or (g.dtype == torch.float32 and bool(g.isfinite().all()))
               for g in grads.values())
    bb = model.backbone
    vision = {'tiny': lambda: bb.vision, 'qwen2_5_vl': lambda: bb.vlm.visual,
              'smolvlm': lambda: bb.vlm.vision_model}[kind]()
    parts = {'vision': vision, 'decoder': bb.decoder, 'lm_head': bb.lm_head,
             'expert': model.expert, 'grounding_head': model.grounding_head}
    for name, part in parts.items():
        assert any(grads.get(p) is not None and bool(grads[p].abs().sum() > 0)
                   for p in part.parameters()), f'{name} got no gradient'
