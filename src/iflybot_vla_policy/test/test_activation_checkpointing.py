"""Activation checkpointing (`trainer.activation_checkpointing`,
`VLA.set_activation_checkpointing`): every backbone block (decoder layers; vision blocks or the
tiny conv stages) and every DiT block is recomputed in the backward, and the losses and
gradients are those without it, for the tiny, Qwen2.5-VL-shaped and SmolVLM-shaped small
configs, every loss on.

The expert attends each decoder layer's keys/values. transformers drops the KV cache of a
checkpointed layer (a DynamicCache would be appended to again by the recomputation), so the
backbone's training pass records them in a cache that each call overwrites: these tests would
fail with a missing cache, a recomputation that sees doubled keys, or keys/values that carry no
gradient back into the layer.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import set_checkpoint_early_stop

from _vla_fixtures import (
    ALL_LOSSES,
    Rows,
    family_config,
    fresh_accelerator_state,  # noqa: F401 (autouse)
    mixed_batch,
    wake,
)
from iflybot_vla_policy.model.vla import VLA
from iflybot_vla_policy.training.config import OptimConfig, TrainerConfig, load_train_config
from iflybot_vla_policy.training.trainer import Trainer
from iflybot_vla_policy.training.vla_stage import VLAObjective

KINDS = ['tiny', 'qwen2_5_vl', 'smolvlm']


def _model(kind: str) -> VLA:
    torch.manual_seed(0)
    # no knowledge insulation (the paper preset's default) and `wake` (zero-initialised gates):
    # the flow loss reaches every decoder layer through the keys/values the expert reads
    return wake(VLA(family_config(kind, **ALL_LOSSES,
                                  **{'loss.knowledge_insulation': False}))).train()


def _losses_and_grads(model: VLA, batch: dict) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    losses = model(batch)
    losses['total'].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def _first_op(block: nn.Module) -> nn.Module:
    return next(m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.mark.parametrize('kind', KINDS)
def test_checkpointing_recomputes_every_block_with_the_same_losses_and_gradients(kind):
    model = _model(kind)
    batch = mixed_batch(model)
    bb = model.backbone
    decoder = list(bb.decoder.layers)
    vision = [m for m in bb.checkpointed_modules() if all(m is not d for d in decoder)]
    assert vision, 'no vision block is checkpointed'
    watched = {'decoder': _first_op(decoder[-1]), 'vision': _first_op(vision[0]),
               'expert': _first_op(model.expert.blocks[-1])}
    calls = dict.fromkeys(watched, 0)
    for name, op in watched.items():
        op.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name,
                                                                             calls[name] + 1))

    off_losses, off_grads = _losses_and_grads(model, batch)
    assert calls == dict.fromkeys(watched, 1)
    assert set(off_losses) == {'flow', 'latent', 'fast', 'text', 'ground', 'total'}

    model.set_activation_checkpointing(True)
    assert bb.activation_checkpointing
    calls.update(dict.fromkeys(watched, 0))
    with set_checkpoint_early_stop(False):          # every recomputed op runs (and is counted)
        on_losses, on_grads = _losses_and_grads(model, batch)
    # each block ran again in the backward
    assert calls == dict.fromkeys(watched, 2)
    for name, value in off_losses.items():
        torch.testing.assert_close(on_losses[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert on_grads.keys() == off_grads.keys() == {n for n, _ in model.named_parameters()}
    for name, grad in off_grads.items():
        torch.testing.assert_close(on_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # the decoder's keys/values reach the expert with their gradient: a layer's key projection
    # gets one from the flow loss alone
    model.zero_grad(set_to_none=True)
    flow = model(batch)['flow']
    flow.backward()
    assert bool(decoder[0].self_attn.k_proj.weight.grad.abs().sum() > 0)

    # off again: nothing recomputed, inference untouched
    model.set_activation_checkpointing(False)
    assert not bb.activation_checkpointing
    calls.update(dict.fromkeys(watched, 0))
    _losses_and_grads(model, batch)
    assert calls == dict.fromkeys(watched, 1)


def test_trainer_switch_trains_the_same_under_bf16_autocast(tmp_path):
    """The paper preset's combination (bf16 autocast + checkpointing) through the trainer: the
    recomputation runs under the forward's autocast state, so two steps give the same losses
    and gradient norms as without checkpointing."""
    histories = {}
    for on in (False, True):
        model = _model('qwen2_5_vl')
        data = Rows(mixed_batch(model))
        cfg = TrainerConfig(steps=2, batch_size=3, checkpoint_every=10, progress=False, cpu=True,
                            mixed_precision='bf16', activation_checkpointing=on,
                            optim=OptimConfig(lr=1e-3, warmup_steps=0))
        trainer = Trainer(VLAObjective(model), data, cfg, tmp_path / str(on),
                          collate_fn=data.collate)
        assert model.backbone.activation_checkpointing == on
        assert all(b.checkpointing == on for b in model.expert.blocks)
        histories[on] = trainer.fit().history
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
    for off_row, on_row in zip(histories[False], histories[True], strict=True):
        for key in ('loss', 'flow', 'latent', 'fast', 'text', 'ground', 'grad_norm'):
            assert on_row[key] == pytest.approx(off_row[key], rel=1e-5, abs=1e-6), key


def test_the_switch_is_validated_and_named(tmp_path):
    path = tmp_path / 't.yaml'
    path.write_text('stage: vla\noutput_dir: out\ntrainer:\n  activation_checkpointing: 1\n')
    with pytest.raises(ValueError, match=r"'trainer\.activation_checkpointing' must be true or "
                                         'false'):
        load_train_config(path)
    path.write_text('stage: vla\noutput_dir: out\ntrainer:\n  activation_checkpoint: true\n')
    with pytest.raises(ValueError, match=r"trainer\.activation_checkpoint'.*did you mean "
                                         r"'trainer\.activation_checkpointing'"):
        load_train_config(path)

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Linear(2, 1)

        def forward(self, batch):
            return {'loss': self.w(batch).sum()}

    cfg = TrainerConfig(steps=1, batch_size=2, progress=False, cpu=True,
                        activation_checkpointing=True)
    with pytest.raises(ValueError, match=r'trainer\.activation_checkpointing.*Plain'):
        Trainer(Plain(), torch.zeros(4, 2), cfg, tmp_path / 'plain')
