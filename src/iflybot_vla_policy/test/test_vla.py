"""VLA training forward: named losses, overfitting a batch, knowledge insulation, VQA batches."""
from __future__ import annotations

import pytest
import torch

from _vla_fixtures import robot_batch, small_model, wake


def _flow_only_grads(model, batch) -> dict[str, float]:
    """Backpropagate the flow loss alone; gradient norm per top-level VLM module."""
    model.zero_grad(set_to_none=True)
    model(batch)['flow'].backward()
    norms: dict[str, float] = {}
    for name, p in model.backbone.named_parameters():
        if p.grad is not None:
            key = name.split('.')[0]
            norms[key] = norms.get(key, 0.0) + float(p.grad.norm())
    return norms


def test_training_forward_returns_named_weighted_losses():
    model = small_model()
    losses = model(robot_batch(model))
    assert set(losses) == {'flow', 'latent', 'fast', 'total'}
    w = model.cfg.loss
    expected = (w.flow_weight * losses['flow'] + w.latent_weight * losses['latent']
                + w.fast_weight * losses['fast'])
    torch.testing.assert_close(losses['total'], expected)
    assert all(torch.isfinite(v) for v in losses.values())


def test_tiny_model_overfits_a_fixed_batch():
    """Fixed batch, fixed flow noise and times: total loss falls at least 10x."""
    torch.manual_seed(0)
    model = small_model()
    batch = robot_batch(model, batch=2)
    batch['noise'] = torch.randn_like(batch['actions'])
    batch['time'] = torch.tensor([0.3, 0.8])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = last = float(model(batch)['total'].detach())
    for _ in range(150):
        loss = model(batch)['total']
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = float(loss.detach())
        if last < first / 10:
            break
    assert last < first / 10, f'loss went from {first:.3f} to only {last:.3f}'


def test_knowledge_insulation_stops_flow_gradients_into_the_vlm():
    model = wake(small_model(**{'loss.knowledge_insulation': True}))
    norms = _flow_only_grads(model, robot_batch(model))
    assert norms == {} or max(norms.values()) == 0.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.expert.parameters())


def test_without_insulation_the_flow_loss_trains_the_vlm():
    model = wake(small_model(**{'loss.knowledge_insulation': False}))
    norms = _flow_only_grads(model, robot_batch(model))
    assert norms.get('decoder', 0.0) > 0.0  # through the per-layer KV
    assert norms.get('vision', 0.0) > 0.0   # through the image tokens and the direct path


def test_fast_tokens_are_hidden_from_the_expert():
    """Changing only the FAST tokens changes the FAST loss but not the flow loss."""
    model = wake(small_model())
    batch = robot_batch(model)
    batch['noise'] = torch.randn_like(batch['actions'])
    batch['time'] = torch.tensor([0.4, 0.6])
    other = dict(batch, fast_tokens=(batch['fast_tokens'] + 7) % model.cfg.tokens.fast_vocab)
    other['fast_tokens'][batch['fast_tokens'] == -100] = -100
    with torch.no_grad():
        a, b = model(batch), model(other)
    torch.testing.assert_close(a['flow'], b['flow'])
    assert not torch.allclose(a['fast'], b['fast'])


def test_vqa_batch_trains_text_targets_only():
    model = small_model()
    batch = robot_batch(model)
    answer = model.tokenizer.encode_text('the red cube is left of the bowl')
    vqa = {k: batch[k] for k in ('images', 'text_ids', 'text_mask')}
    vqa['answer_ids'] = torch.tensor([answer, answer[:4] + [-100] * (len(answer) - 4)])
    losses = model(vqa)
    assert set(losses) == {'text', 'total'}
    losses['total'].backward()
    assert all(p.grad is None for p in model.expert.parameters())


def test_mixed_robot_and_vqa_batch_gives_every_loss():
    model = small_model()
    batch = robot_batch(model, batch=3)
    answer = model.tokenizer.encode_text('yes')
    batch['answer_ids'] = torch.tensor([[-100] * 2, [-100] * 2, (answer + [-100])[:2]])
    batch['is_robot'] = torch.tensor([True, True, False])
    losses = model(batch)
    assert set(losses) == {'flow', 'latent', 'fast', 'text', 'total'}


def test_robot_batch_without_latent_tokens_is_a_clear_error():
    model = small_model()
    batch = robot_batch(model)
    del batch['latent_tokens']
    with pytest.raises(ValueError, match="'latent_tokens'"):
        model(batch)
    flow_only = small_model(**{'tokens.latent_tokens': 0})
    assert 'latent' not in flow_only(batch)


def test_out_of_range_fast_ids_are_rejected():
    model = small_model()
    batch = robot_batch(model)
    batch['fast_tokens'][0, 0] = model.cfg.tokens.fast_vocab
    with pytest.raises(ValueError, match="'fast_tokens'"):
        model(batch)


def test_unpadded_actions_are_a_clear_error():
    model = small_model()
    batch = robot_batch(model)
    batch['actions'] = batch['actions'][..., :7]
    with pytest.raises(ValueError, match=r"'actions' must have shape \(2, 8, 8\)"):
        model(batch)


def test_grounding_head_regresses_the_targets_of_grounded_rows_only():
    model = small_model(**{'loss.grounding_weight': 2.0})
    batch = robot_batch(model, batch=2)
    batch['grounding'] = torch.zeros(2, 2, 3)
    batch['grounding_mask'] = torch.tensor([True, False])
    losses = model(batch)
    assert 'ground' in losses and float(losses['ground'].detach()) > 0
    w = model.cfg.loss
    expected = (w.flow_weight * losses['flow'] + w.latent_weight * losses['latent']
                + w.fast_weight * losses['fast'] + 2.0 * losses['ground'])
    torch.testing.assert_close(losses['total'], expected)
    # the masked row's target does not count
    batch['grounding'][1] = 5.0
    torch.testing.assert_close(model(batch)['ground'], losses['ground'])
    batch['grounding'][0] = 5.0
    assert float(model(batch)['ground'].detach()) > float(losses['ground'].detach())
    # it trains the vision tower the expert reads
    model.zero_grad(set_to_none=True)
    model(batch)['ground'].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.backbone.vision.parameters())


def test_grounding_weight_needs_the_direct_vision_path():
    with pytest.raises(ValueError, match='grounding_weight > 0 needs expert.direct_vision'):
        small_model(**{'loss.grounding_weight': 1.0, 'expert.direct_vision': False})


def test_without_grounding_targets_the_head_adds_no_loss():
    model = small_model(**{'loss.grounding_weight': 1.0})
    assert 'ground' not in model(robot_batch(model))
