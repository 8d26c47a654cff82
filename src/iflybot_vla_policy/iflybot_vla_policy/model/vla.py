"""The VLA model: backbone + action expert, the training losses, and the pieces inference uses.

Training batch (tensors, already transformed and normalised; B samples):
- `images` (B, n_cam, 3, S, S) float in [0, 1] (uint8 accepted), `text_ids`/`text_mask` (B, T);
- robot samples: `state` (B, state_dim), `actions` (B, H, action_dim), optional `action_mask`
  (B, H) bool of real (non-padded) steps, `latent_tokens` (B, n_latent) int64 codes in
  [0, codebook) and `fast_tokens` (B, L) int64 FAST ids, both padded with -100;
- VQA samples: `answer_ids` (B, L) int64 text ids padded with -100 (text targets only);
- optional `is_robot` (B,) bool when one batch mixes both (default: robot iff `actions` given);
- optional `grounding` (B, 2, 3) float and `grounding_mask` (B,) bool: where the named object
  and its destination are (normalised), for the grounding head (`loss.grounding_weight`).

The sequence is [image tokens, instruction, suffix] with suffix = [latent codes, FAST tokens] for
robot samples and the answer for VQA. The expert attends the prefix and latent tokens of each
layer; FAST positions are masked out of its attention, as at inference where they never exist.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iflybot_vla_policy.config import VLAConfig
from iflybot_vla_policy.model.action_expert import (
    ActionExpert,
    ExpertContext,
    flow_targets,
    sample_flow_time,
)
from iflybot_vla_policy.model.backbone import KV, PrefixCache, build_backbone, masked_ce
from iflybot_vla_policy.model.text_tokenizer import TextTokenizer

GROUNDING_POINTS = 2   # the named object, then its destination (training/grounding.py)


def as_float_images(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


class VLA(nn.Module):
    def __init__(self, cfg: VLAConfig, tokenizer: TextTokenizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg, tokenizer)
        bb = self.backbone
        self.expert = ActionExpert(cfg, bb.n_layers, bb.kv_heads, bb.head_dim,
                                   bb.feature_dim if cfg.expert.direct_vision else 0)
        self.grounding_head: nn.Module | None = None
        if cfg.loss.grounding_weight > 0:
            if not cfg.expert.direct_vision:
                raise ValueError('loss.grounding_weight > 0 needs expert.direct_vision: the '
                                 'grounding head reads the vision summary the expert reads')
            d = bb.feature_dim
            self.grounding_head = nn.Sequential(nn.Linear(d, d), nn.GELU(),
                                                nn.Linear(d, GROUNDING_POINTS * 3))

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.backbone.tokenizer

    def vlm_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    # -- expert context from a KV cache

    @staticmethod
    def _insulated(kv: KV, features: torch.Tensor | None, summary: torch.Tensor | None,
                   insulate: bool) -> tuple[KV, torch.Tensor | None, torch.Tensor | None]:
        """Knowledge insulation: the expert reads a detached copy of everything from the VLM."""
        if not insulate:
            return kv, features, summary
        return ([(k.detach(), v.detach()) for k, v in kv],
                None if features is None else features.detach(),
                None if summary is None else summary.detach())

    def expert_context(self, kv: KV, mask: torch.Tensor, features: torch.Tensor | None,
                       summary: torch.Tensor | None, insulate: bool) -> ExpertContext:
        kv, features, summary = self._insulated(kv, features, summary, insulate)
        return self.expert.context(kv, mask, features, summary)

    def tie_weights(self) -> None:
        """Re-tie the backbone's tied weights (accelerate's FSDP loading calls this)."""
        self.backbone.tie_weights()

    # -- activation checkpointing

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Training passes recompute every backbone block (decoder layers, vision blocks or
        conv stages) and every DiT block in the backward instead of keeping their activations:
        the same losses and gradients for about one more forward pass of compute."""
        self.backbone.set_activation_checkpointing(enabled)
        self.expert.set_activation_checkpointing(enabled)

    def context_from_prefix(self, prefix: PrefixCache) -> ExpertContext:
        return self.expert_context(prefix.kv, prefix.mask, prefix.features, prefix.summary,
                                   insulate=False)

    # -- training

    def _suffix(self, batch: dict, is_robot: torch.Tensor) -> dict[str, torch.Tensor]:
        """Suffix ids/mask (B, L) and per-kind targets (-100 elsewhere)."""
        cfg = self.cfg
        b = is_robot.shape[0]
        device = is_robot.device
        n_lat = cfg.tokens.latent_tokens
        parts_len = 0
        lat = batch.get('latent_tokens')
        fast = batch.get('fast_tokens')
        ans = batch.get('answer_ids')
        if bool(is_robot.any()):
            if n_lat and lat is None:
                raise ValueError("batch key 'latent_tokens' is required (tokens.latent_tokens = "
                                 f'{n_lat}); set tokens.latent_tokens=0 to train without LAM')
            if lat is not None and lat.shape[1] != n_lat:
                raise ValueError(f"batch key 'latent_tokens' must be (B, {n_lat}), got "
                                 f'{tuple(lat.shape)}')
            parts_len = n_lat + (fast.shape[1] if fast is not None and cfg.tokens.fast_vocab
                                 else 0)
        ans_len = ans.shape[1] if ans is not None else 0
        length = max(parts_len, ans_len, 1)
        ids = torch.full((b, length), self.tokenizer.pad_id, dtype=torch.long, device=device)
        lat_t = torch.full((b, length), -100, dtype=torch.long, device=device)
        fast_t, text_t = lat_t.clone(), lat_t.clone()
        robot = is_robot[:, None]
        if n_lat and lat is not None:
            codes = lat.to(device)
            if bool(((codes < -100) | (codes >= cfg.tokens.latent_codebook) |
                     ((codes < 0) & (codes != -100))).any()):
                raise ValueError("batch key 'latent_tokens': codes must be in "
                                 f'[0, {cfg.tokens.latent_codebook}) or -100')
            valid = (codes != -100) & robot
            ids[:, :n_lat] = torch.where(valid, codes + cfg.latent_offset, ids[:, :n_lat])
            lat_t[:, :n_lat] = torch.where(valid, codes + cfg.latent_offset, -100)
        if fast is not None and cfg.tokens.fast_vocab and bool(is_robot.any()):
            toks = fast.to(device)
            if bool(((toks >= cfg.tokens.fast_vocab) | ((toks < 0) & (toks != -100))).any()):
                raise ValueError("batch key 'fast_tokens': ids must be in "
                                 f'[0, {cfg.tokens.fast_vocab}) or -100')
            sl = slice(n_lat, n_lat + toks.shape[1])
            valid = (toks != -100) & robot
            ids[:, sl] = torch.where(valid, toks + cfg.fast_offset, ids[:, sl])
            fast_t[:, sl] = torch.where(valid, toks + cfg.fast_offset, -100)
        if ans is not None:
            a = ans.to(device)
            valid = (a != -100) & ~robot
            ids[:, :ans_len] = torch.where(valid, a, ids[:, :ans_len])
            text_t[:, :ans_len] = torch.where(valid, a, -100)
        mask = (lat_t != -100) | (fast_t != -100) | (text_t != -100)
        return {'ids': ids, 'mask': mask, 'latent': lat_t, 'fast': fast_t, 'text': text_t}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Named losses: 'flow', 'latent', 'fast', 'text', 'ground' (those present), 'total'."""
        cfg = self.cfg
        images = as_float_images(batch['images'])
        b = images.shape[0]
        has_actions = 'actions' in batch
        is_robot = batch.get('is_robot')
        if is_robot is None:
            is_robot = torch.full((b,), has_actions, dtype=torch.bool)
        is_robot = is_robot.to(images.device).bool()
        if bool(is_robot.any()):
            self._check_robot_batch(batch, b)
        suffix = self._suffix(batch, is_robot)
        out = self.backbone.forward_train(images, batch['text_ids'], batch['text_mask'],
                                          suffix['ids'], suffix['mask'])
        losses: dict[str, torch.Tensor] = {}
        weights = {'flow': cfg.loss.flow_weight, 'latent': cfg.loss.latent_weight,
                   'fast': cfg.loss.fast_weight, 'text': cfg.loss.text_weight}
        for kind in ('latent', 'fast', 'text'):
            if bool((suffix[kind] != -100).any()):
                losses[kind] = masked_ce(out.logits, suffix[kind])
        if bool(is_robot.any()):
            losses['flow'] = self._flow_loss(batch, out, suffix, is_robot)
        if self.grounding_head is not None and 'grounding' in batch:
            weights['ground'] = cfg.loss.grounding_weight
            losses['ground'] = self._grounding_loss(batch, out.summary)
        if not losses:
            raise ValueError("batch has no robot samples and no 'answer_ids': nothing to learn")
        losses['total'] = sum(weights[k] * v for k, v in losses.items())
        return losses

    def grounding(self, summary: torch.Tensor) -> torch.Tensor:
        """(B, D) vision summary -> (B, 2, 3) predicted grounding points (normalised units)."""
        assert self.grounding_head is not None
        return self.grounding_head(summary).view(-1, GROUNDING_POINTS, 3)

    def _grounding_loss(self, batch: dict, summary: torch.Tensor | None) -> torch.Tensor:
        """MSE of the grounding points over the samples that have a target (0 when none)."""
        if summary is None:
            raise ValueError('the backbone returned no vision summary for the grounding head')
        target = batch['grounding'].to(summary.device).float()          # (B, 2, 3)
        keep = batch['grounding_mask'].to(summary.device).float()        # (B,)
        err = F.mse_loss(self.grounding(summary).float(), target, reduction='none')
        return (err.mean(dim=(1, 2)) * keep).sum() / keep.sum().clamp(min=1.0)

    def _check_robot_batch(self, batch: dict, b: int) -> None:
        a = self.cfg.action
        want = {'state': (b, a.state_dim), 'actions': (b, a.horizon, a.action_dim)}
        for key, shape in want.items():
            if key not in batch:
                raise ValueError(f"batch has robot samples but no '{key}'")
            if tuple(batch[key].shape) != shape:
                raise ValueError(f"batch key '{key}' must have shape {shape} (padded model "
                                 f'dims), got {tuple(batch[key].shape)}')
    def _flow_loss(self, batch: dict, out, suffix: dict, is_robot: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        idx = is_robot.nonzero()[:, 0]
        n_lat = cfg.tokens.latent_tokens
        # expert keys: real prefix tokens + latent tokens; FAST (and answer) positions masked
        key_mask = out.mask.clone()
        key_mask[:, out.prefix_len + n_lat:] = False
        kv = [(k[idx], v[idx]) for k, v in out.kv]
        feats = None if out.features is None else out.features[idx]
        summ = None if out.summary is None else out.summary[idx]
        kv, feats, summ = self._insulated(kv, feats, summ, cfg.loss.knowledge_insulation)
        actions = batch['actions'][idx].float()                       # (b, H, A)
        state = batch['state'][idx].float()                           # (b, Ds)
        noise = batch.get('noise')
        noise = torch.randn_like(actions) if noise is None else noise[idx].float()
        t = batch.get('time')
        t = sample_flow_time(len(idx), cfg, actions.device) if t is None else t[idx].float()
        x_t, target = flow_targets(actions, noise, t)
        v = self.expert.forward_train(state, x_t, t, kv, key_mask[idx], feats, summ)
        err = F.mse_loss(v.float(), target, reduction='none')          # (b, H, A)
        dims = torch.zeros(err.shape[-1], device=err.device)
        dims[:cfg.robot_action_dim] = 1.0                             # padded dims carry no loss
        steps = batch.get('action_mask')
        steps = torch.ones(err.shape[:2], device=err.device) if steps is None \
            else steps[idx].float()
        w = steps[..., None] * dims
        return (err * w).sum() / w.sum().clamp(min=1.0)
