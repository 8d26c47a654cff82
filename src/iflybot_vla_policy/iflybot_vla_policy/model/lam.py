"""Latent action model (LAM): discrete "what happened" codes from a pair of video frames.

iFlyBot-VLA supervises its VLM with 8 latent action tokens per chunk, taken from a VQ model
trained without action labels on frame pairs (t, t + delta), about 1 s apart. The model here:

- encoder: both frames are patchified; a spatial-temporal transformer (attention within each
  frame, then across the two frames at each patch position) mixes them; ``n_tokens`` learned
  queries read the pair out by cross-attention;
- quantiser: each query is projected to ``code_dim``, L2-normalised and snapped to the nearest of
  ``codebook_size`` codes (straight-through gradient, commitment loss). The codebook is an
  exponential moving average of the vectors assigned to each code; a code used less than
  ``dead_fraction`` of its fair share is restarted from a recent encoder output, so the
  codebook stays in use instead of collapsing onto a few codes;
- decoder: a transformer over the patches of frame t plus the quantised codes, predicting the
  per-pixel change to frame t + delta. The codes are the only path for information about
  frame t + delta, so they must carry the change (the "latent action").

Frames are accepted as uint8 in [0, 255] or float in [0, 1], laid out (B, H, W, 3) or
(B, 3, H, W), with H == W == ``image_size``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = 'lam_config.json'
WEIGHTS_FILE = 'lam.safetensors'
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LAMConfig:
    """Sizes and quantiser knobs of the latent action model (defaults: the tiny CPU model)."""

    image_size: int = 64          # frames are image_size x image_size RGB
    patch: int = 8                # square patch side in pixels
    width: int = 64               # transformer hidden size
    depth: int = 2                # spatial-temporal encoder blocks
    decoder_depth: int = 2        # decoder blocks
    readout_depth: int = 1        # query cross-attention blocks that form the latent tokens
    heads: int = 4
    mlp_ratio: float = 4.0
    n_tokens: int = 8             # latent action tokens per frame pair (paper: 8)
    codebook_size: int = 32       # codes (paper: 32)
    code_dim: int = 16            # dimension of the quantised vectors
    commitment: float = 0.02      # weight of the commitment loss (0.25 over-contracts codes)
    ema_decay: float = 0.95       # EMA decay of the codebook statistics
    dead_fraction: float = 0.1    # a code is dead below this fraction of the mean usage
    restart_every: int = 10       # training steps between dead-code checks
    restart_buffer: int = 2048    # recent encoder outputs kept to restart dead codes from

    def __post_init__(self) -> None:
        positive = ('image_size', 'patch', 'width', 'depth', 'decoder_depth', 'readout_depth',
                    'heads', 'n_tokens', 'codebook_size', 'code_dim', 'restart_every',
                    'restart_buffer')
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f'LAMConfig.{name} must be a positive int, got {value!r}')
        if self.image_size % self.patch:
            raise ValueError(f'LAMConfig.image_size ({self.image_size}) must be a multiple of '
                             f'LAMConfig.patch ({self.patch})')
        if self.width % self.heads:
            raise ValueError(f'LAMConfig.width ({self.width}) must be divisible by '
                             f'LAMConfig.heads ({self.heads})')
        if self.codebook_size < 2:
            raise ValueError(f'LAMConfig.codebook_size must be >= 2, got {self.codebook_size}')
        if not self.mlp_ratio > 0:
            raise ValueError(f'LAMConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}')
        if not self.commitment >= 0:
            raise ValueError(f'LAMConfig.commitment must be >= 0, got {self.commitment!r}')
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f'LAMConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}')
        if not 0.0 <= self.dead_fraction < 1.0:
            raise ValueError(
                f'LAMConfig.dead_fraction must be in [0, 1), got {self.dead_fraction!r}')

    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.patch) ** 2


# ---------------------------------------------------------------------------------- blocks


class _MLP(nn.Sequential):
    def __init__(self, width: int, ratio: float):
        hidden = int(width * ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class _SelfBlock(nn.Module):
    """Pre-norm transformer block: self-attention + MLP over (batch, tokens, width)."""

    def __init__(self, width: int, heads: int, ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = _MLP(width, ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _STBlock(nn.Module):
    """Spatial attention within each frame, then temporal attention across frames per patch."""

    def __init__(self, width: int, heads: int, ratio: float):
        super().__init__()
        self.norm_s = nn.LayerNorm(width)
        self.attn_s = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_t = nn.LayerNorm(width)
        self.attn_t = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_m = nn.LayerNorm(width)
        self.mlp = _MLP(width, ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, p, w = x.shape                                      # (B, frames, patches, width)
        s = x.reshape(b * t, p, w)
        h = self.norm_s(s)
        s = s + self.attn_s(h, h, h, need_weights=False)[0]
        x = s.reshape(b, t, p, w).transpose(1, 2).reshape(b * p, t, w)
        h = self.norm_t(x)
        x = x + self.attn_t(h, h, h, need_weights=False)[0]
        x = x.reshape(b, p, t, w).transpose(1, 2)
        return x + self.mlp(self.norm_m(x))


class _ReadoutBlock(nn.Module):
    """Latent queries: self-attention among themselves, cross-attention to the frame tokens."""

    def __init__(self, width: int, heads: int, ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.attn_q = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_c = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn_c = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_m = nn.LayerNorm(width)
        self.mlp = _MLP(width, ratio)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        h = self.norm_q(q)
        q = q + self.attn_q(h, h, h, need_weights=False)[0]
        h, m = self.norm_c(q), self.norm_kv(kv)
        q = q + self.attn_c(h, m, m, need_weights=False)[0]
        return q + self.mlp(self.norm_m(q))


# ---------------------------------------------------------------------------------- quantiser


class _EMAQuantizer(nn.Module):
    """Cosine nearest-code VQ with an EMA codebook and dead-code restart."""

    def __init__(self, cfg: LAMConfig):
        super().__init__()
        self.cfg = cfg
        k, d = cfg.codebook_size, cfg.code_dim
        embed = F.normalize(torch.randn(k, d), dim=-1)
        self.register_buffer('embed', embed)                         # (K, D) unit vectors
        self.register_buffer('cluster_size', torch.zeros(k))          # EMA assignment counts
        self.register_buffer('embed_sum', embed.clone() * 0)          # EMA sums of assignees
        self.register_buffer('recent', torch.zeros(cfg.restart_buffer, d))
        self.register_buffer('recent_count', torch.zeros((), dtype=torch.long))
        self.register_buffer('steps', torch.zeros((), dtype=torch.long))
        self.register_buffer('restarts', torch.zeros((), dtype=torch.long))

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) unit vectors -> (...) int64 index of the nearest code."""
        return (z @ self.embed.t()).argmax(dim=-1)

    def forward(self, z: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """z (B, N, D) unit vectors -> (straight-through quantised z, codes (B, N), restarts)."""
        codes = self.codes(z)
        quantised = self.embed[codes]
        restarted = 0
        if update:
            with torch.no_grad():
                restarted = self._update(z.detach().reshape(-1, z.shape[-1]), codes.reshape(-1))
        return z + (quantised - z).detach(), codes, restarted

    def _update(self, flat: torch.Tensor, codes: torch.Tensor) -> int:
        cfg = self.cfg
        onehot = F.one_hot(codes, cfg.codebook_size).to(flat.dtype)   # (M, K)
        counts, sums = onehot.sum(0), onehot.t() @ flat                # (K,), (K, D)
        if _distributed():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        if int(self.steps) == 0:
            self._init_from(flat)
            return 0
        decay = cfg.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        used = self.cluster_size > 1e-6
        updated = F.normalize(self.embed_sum, dim=-1)
        self.embed.copy_(torch.where(used[:, None], updated, self.embed))
        self._remember(flat)
        self.steps.add_(1)
        if int(self.steps) % cfg.restart_every:
            return 0
        return self._restart_dead()

    def _init_from(self, flat: torch.Tensor) -> None:
        """First training batch: codes start at distinct encoder outputs (data-dependent init)."""
        k = self.cfg.codebook_size
        pick = torch.randperm(flat.shape[0], device=flat.device)[:k]
        if pick.numel() < k:
            pick = torch.cat([pick, torch.randint(flat.shape[0], (k - pick.numel(),),
                                                  device=flat.device)])
        fresh = F.normalize(flat[pick] + 0.01 * torch.randn_like(flat[pick]), dim=-1)
        if _distributed():
            torch.distributed.broadcast(fresh, src=0)
        fair = flat.shape[0] * (torch.distributed.get_world_size() if _distributed() else 1) / k
        self.embed.copy_(fresh)
        self.cluster_size.fill_(fair)
        self.embed_sum.copy_(fresh * fair)
        self._remember(flat)
        self.steps.add_(1)

    def _remember(self, flat: torch.Tensor) -> None:
        """Append encoder outputs to the ring buffer of recent ones."""
        size = self.recent.shape[0]
        flat = flat[-size:]
        start = int(self.recent_count) % size
        idx = (torch.arange(flat.shape[0], device=flat.device) + start) % size
        self.recent[idx] = flat
        self.recent_count.add_(flat.shape[0])

    def _restart_dead(self) -> int:
        mean = self.cluster_size.mean()
        dead = (self.cluster_size < self.cfg.dead_fraction * mean).nonzero().flatten()
        available = min(int(self.recent_count), self.recent.shape[0])
        if dead.numel() == 0 or available == 0:
            return 0
        pick = torch.randint(available, (dead.numel(),), device=self.recent.device)
        fresh = self.recent[pick] + 0.01 * torch.randn_like(self.recent[pick])
        fresh = F.normalize(fresh, dim=-1)
        if _distributed():                                            # keep ranks identical
            torch.distributed.broadcast(fresh, src=0)
        self.embed[dead] = fresh
        self.cluster_size[dead] = mean
        self.embed_sum[dead] = fresh * mean
        self.restarts.add_(dead.numel())
        return int(dead.numel())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def code_usage(codes: torch.Tensor, codebook_size: int) -> dict[str, Any]:
    """Usage statistics of integer codes: codes used, fraction used, perplexity, counts."""
    counts = torch.bincount(codes.reshape(-1).to(torch.long).cpu(), minlength=codebook_size)
    probs = counts.double() / max(int(counts.sum()), 1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    used = int((counts > 0).sum())
    return {'used': used, 'fraction': used / codebook_size,
            'perplexity': float(entropy.exp()), 'counts': counts.tolist()}


# ---------------------------------------------------------------------------------- model


class LatentActionModel(nn.Module):
    """VQ latent action model over frame pairs; see the module docstring for the layout."""

    def __init__(self, config: LAMConfig | None = None):
        super().__init__()
        cfg = config or LAMConfig()
        self.config = cfg
        w, p, n = cfg.width, cfg.patch, cfg.patches_per_frame
        patch_dim = 3 * p * p
        self.enc_embed = nn.Linear(2 * patch_dim, w)
        self.enc_pos = nn.Parameter(torch.randn(1, 1, n, w) * 0.02)
        self.enc_time = nn.Parameter(torch.randn(1, 2, 1, w) * 0.02)
        self.encoder = nn.ModuleList(_STBlock(w, cfg.heads, cfg.mlp_ratio)
                                     for _ in range(cfg.depth))
        self.queries = nn.Parameter(torch.randn(1, cfg.n_tokens, w) * 0.02)
        self.readout = nn.ModuleList(_ReadoutBlock(w, cfg.heads, cfg.mlp_ratio)
                                     for _ in range(cfg.readout_depth))
        self.to_code = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, cfg.code_dim))
        # running statistics of the per-token standardisation before quantisation
        self.register_buffer('code_mean', torch.zeros(cfg.n_tokens * cfg.code_dim))
        self.register_buffer('code_var', torch.ones(cfg.n_tokens * cfg.code_dim))
        self.quantizer = _EMAQuantizer(cfg)
        self.from_code = nn.Linear(cfg.code_dim, w)
        self.code_pos = nn.Parameter(torch.randn(1, cfg.n_tokens, w) * 0.02)
        self.dec_embed = nn.Linear(patch_dim, w)
        self.dec_pos = nn.Parameter(torch.randn(1, n, w) * 0.02)
        self.decoder = nn.ModuleList(_SelfBlock(w, cfg.heads, cfg.mlp_ratio)
                                     for _ in range(cfg.decoder_depth))
        self.dec_norm = nn.LayerNorm(w)
        self.to_pixels = nn.Linear(w, patch_dim)
        nn.init.normal_(self.to_pixels.weight, std=0.01)   # start near "no change"
        nn.init.zeros_(self.to_pixels.bias)

    # ------------------------------------------------------------------ public API

    def forward(self, frames_t: Any, frames_tp: Any) -> dict[str, torch.Tensor]:
        """Losses and codes for a batch of pairs; in train mode also updates the codebook.

        Returns 'loss' (recon + commitment * commit), 'recon' (pixel MSE in [-1, 1] units),
        'commit', 'codes' (B, n_tokens) int64, 'pred' (B, 3, H, W) predicted frame t + delta in
        [0, 1], 'perplexity' and 'usage' (fraction of codes used in this batch), 'restarts'.
        """
        x_t, x_tp = self._pair(frames_t, frames_tp)
        if self.training and x_t.shape[0] < 2:
            raise ValueError(f'training batches need at least 2 frame pairs, got {x_t.shape[0]}')
        z = self._encode(x_t, x_tp, update=self.training)             # (B, N, code_dim)
        q, codes, restarted = self.quantizer(z, update=self.training)
        commit = F.mse_loss(z, q.detach())
        pred = self._decode(x_t, q)                                   # (B, 3, H, W) in [-1, 1]
        recon = F.mse_loss(pred, x_tp)
        stats = code_usage(codes, self.config.codebook_size)
        return {
            'loss': recon + self.config.commitment * commit,
            'recon': recon,
            'commit': commit,
            'codes': codes,
            'pred': ((pred.detach() + 1) / 2).clamp(0, 1),
            'perplexity': torch.tensor(stats['perplexity']),
            'usage': torch.tensor(stats['fraction']),
            'restarts': torch.tensor(restarted),
        }

    @torch.no_grad()
    def encode(self, frames_t: Any, frames_tp: Any) -> torch.Tensor:
        """Latent action codes (B, n_tokens) int64 in [0, codebook_size); no codebook update."""
        x_t, x_tp = self._pair(frames_t, frames_tp)
        return self.quantizer.codes(self._encode(x_t, x_tp, update=False))

    @torch.no_grad()
    def decode(self, frames_t: Any, codes: torch.Tensor) -> torch.Tensor:
        """Predicted frame t + delta (B, 3, H, W) float in [0, 1] from frame t and codes."""
        x_t = self._frames(frames_t, 'frames_t')
        codes = torch.as_tensor(codes, device=x_t.device)
        expected = (x_t.shape[0], self.config.n_tokens)
        if tuple(codes.shape) != expected:
            raise ValueError(f'codes must have shape {expected}, got {tuple(codes.shape)}')
        if codes.dtype.is_floating_point or codes.min() < 0 or (
                codes.max() >= self.config.codebook_size):
            raise ValueError(f'codes must be integers in [0, {self.config.codebook_size})')
        return ((self._decode(x_t, self.quantizer.embed[codes.long()]) + 1) / 2).clamp(0, 1)

    def codebook_usage(self, frames_t: Any, frames_tp: Any) -> dict[str, Any]:
        """Codes used by these pairs: {'used', 'fraction', 'perplexity', 'counts'}."""
        return code_usage(self.encode(frames_t, frames_tp), self.config.codebook_size)

    def save(self, directory: str | Path) -> Path:
        """Write ``lam_config.json`` and ``lam.safetensors`` (weights + codebook state)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {'format': FORMAT_VERSION, **dataclasses.asdict(self.config)}
        (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + '\n')
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={'format': str(FORMAT_VERSION)})
        return directory

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = 'cpu'
             ) -> LatentActionModel:
        """Model saved by ``save``, in eval mode; errors name the missing/bad file and key."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f'latent action model file missing: {path}')
        model = cls(_read_config(config_path))
        try:
            state = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f'{weights_path}: cannot be read as safetensors ({exc})') from exc
        expected = model.state_dict()
        for key, tensor in expected.items():
            if key not in state:
                raise ValueError(f'{weights_path}: missing key {key!r}')
            if tuple(state[key].shape) != tuple(tensor.shape):
                raise ValueError(f'{weights_path}: key {key!r} has shape '
                                 f'{tuple(state[key].shape)}, expected {tuple(tensor.shape)}')
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise ValueError(f'{weights_path}: unexpected key {unexpected[0]!r}')
        model.load_state_dict(state)
        return model.to(map_location).eval()

    # ------------------------------------------------------------------ internals

    def _pair(self, frames_t: Any, frames_tp: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x_t = self._frames(frames_t, 'frames_t')
        x_tp = self._frames(frames_tp, 'frames_tp')
        if x_t.shape != x_tp.shape:
            raise ValueError(f'frames_t and frames_tp differ in shape: {tuple(x_t.shape)} vs '
                             f'{tuple(x_tp.shape)}')
        return x_t, x_tp

    def _frames(self, frames: Any, name: str) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1], (B, S, S, 3) or (B, 3, S, S) -> float (B, 3, S, S)
        in [-1, 1] on the model's device."""
        x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
        s = self.config.image_size
        if x.ndim != 4:
            raise ValueError(f'{name} must be 4-D (B, {s}, {s}, 3) or (B, 3, {s}, {s}), got '
                             f'shape {tuple(x.shape)}')
        if x.shape[0] == 0:
            raise ValueError(f'{name} is an empty batch')
        if tuple(x.shape[1:]) == (s, s, 3):
            x = x.permute(0, 3, 1, 2)
        elif tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f'{name} must have shape (B, {s}, {s}, 3) or (B, 3, {s}, {s}) '
                             f'(LAMConfig.image_size={s}), got {tuple(x.shape)}')
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.dtype.is_floating_point:
            if not torch.isfinite(x).all():
                raise ValueError(f'{name} contains NaN or inf')
            if x.min() < -1e-3 or x.max() > 1 + 1e-3:
                raise ValueError(f'float {name} must be in [0, 1] (uint8 frames are scaled by '
                                 f'the model), got values in [{float(x.min()):.3g}, '
                                 f'{float(x.max()):.3g}]')
            x = x.float()
        else:
            raise ValueError(f'{name} must be uint8 or float, got {x.dtype}')
        device = self.enc_pos.device
        return (x.to(device) * 2 - 1).contiguous()

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, patches, 3 * patch * patch)."""
        b, p = x.shape[0], self.config.patch
        g = self.config.image_size // p
        x = x.reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, g * g, 3 * p * p)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p = x.shape[0], self.config.patch
        g = self.config.image_size // p
        x = x.reshape(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, 3, g * p, g * p)

    def _encode(self, x_t: torch.Tensor, x_tp: torch.Tensor, update: bool) -> torch.Tensor:
        """Frame pair -> (B, n_tokens, code_dim) unit vectors before quantisation; update:
        standardise with (and update) batch statistics instead of the running ones."""
        p_t, p_tp = self._patchify(x_t), self._patchify(x_tp)
        diff = p_tp - p_t                    # explicit change channel: what the codes must carry
        tokens = torch.stack([torch.cat([p_t, diff], -1), torch.cat([p_tp, diff], -1)], dim=1)
        h = self.enc_embed(tokens) + self.enc_pos + self.enc_time    # (B, 2, P, W)
        for block in self.encoder:
            h = block(h)
        kv = h.reshape(h.shape[0], -1, h.shape[-1])                 # (B, 2P, W)
        q = self.queries.expand(h.shape[0], -1, -1)
        for block in self.readout:
            q = block(q, kv)
        z = self.to_code(q)                                          # (B, N, code_dim)
        # Each token is standardised over the batch (running statistics outside training):
        # this removes what every pair shares and keeps each token varying across pairs, so
        # codes are assigned by what differs. Without it z starts out nearly constant and the
        # commitment loss collapses each token onto one code before the decoder uses them.
        flat = F.batch_norm(z.reshape(z.shape[0], -1), self.code_mean, self.code_var,
                            training=update, momentum=0.1)
        return F.normalize(flat.reshape(z.shape), dim=-1)

    def _decode(self, x_t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Frame t (B, 3, S, S) in [-1, 1] + quantised codes (B, N, D) -> frame t + delta."""
        patches = self._patchify(x_t)
        h = torch.cat([self.dec_embed(patches) + self.dec_pos,
                       self.from_code(q) + self.code_pos], dim=1)
        for block in self.decoder:
            h = block(h)
        delta = self.to_pixels(self.dec_norm(h[:, :patches.shape[1]]))
        return self._unpatchify(patches + delta)


def _read_config(path: Path) -> LAMConfig:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f'{path}: not valid JSON ({exc})') from exc
    if not isinstance(raw, dict):
        raise ValueError(f'{path}: expected a JSON object')
    version = raw.pop('format', None)
    if version != FORMAT_VERSION:
        raise ValueError(f'{path}: key "format" is {version!r}, expected {FORMAT_VERSION}')
    fields = {f.name for f in dataclasses.fields(LAMConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        valid = ', '.join(sorted(fields))
        raise ValueError(f'{path}: unknown key {unknown[0]!r} (valid: {valid})')
    try:
        return LAMConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f'{path}: {exc}') from exc


# ---------------------------------------------------------------------------------- training


def train_lam(model: LatentActionModel, frame_pairs: Iterable[tuple[Any, Any]], steps: int,
              lr: float = 3e-4, weight_decay: float = 0.01, warmup_steps: int = 0,
              grad_clip: float = 1.0,
              on_step: Callable[[dict[str, float]], None] | None = None,
              optimizer: torch.optim.Optimizer | None = None) -> list[dict[str, float]]:
    """Plain AdamW loop over (frames_t, frames_tp) batches; returns one record per step.

    ``frame_pairs`` may be an iterator (error if it runs out before ``steps``) or a re-iterable
    such as a DataLoader (restarted each epoch). Records hold step, loss, recon, commit,
    perplexity, usage, restarts, lr, seconds; ``on_step`` sees each record (progress, CSV).
    Pass ``optimizer`` to resume with its state; the codebook state lives in the model.
    """
    if steps < 0:
        raise ValueError(f'steps must be >= 0, got {steps}')
    if not lr > 0:
        raise ValueError(f'lr must be > 0, got {lr}')
    if optimizer is None:
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and 'pos' not in n
                 and 'queries' not in n and 'time' not in n]
        no_decay = [p for n, p in model.named_parameters() if not any(p is d for d in decay)]
        optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                                       {'params': no_decay, 'weight_decay': 0.0}], lr=lr)
    reiterable = iter(frame_pairs) is not frame_pairs
    batches = iter(frame_pairs)
    model.train()
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(steps):
        try:
            frames_t, frames_tp = next(batches)
        except StopIteration:
            if not reiterable:
                raise ValueError(f'frame_pairs ran out after {step} of {steps} steps') from None
            batches = iter(frame_pairs)
            try:
                frames_t, frames_tp = next(batches)
            except StopIteration:
                raise ValueError('frame_pairs yielded no batches') from None
        step_lr = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr
        for group in optimizer.param_groups:
            group['lr'] = step_lr
        out = model(frames_t, frames_tp)
        optimizer.zero_grad(set_to_none=True)
        out['loss'].backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        record = {'step': step + 1, 'lr': step_lr,
                  'seconds': time.perf_counter() - start}
        for key in ('loss', 'recon', 'commit', 'perplexity', 'usage', 'restarts'):
            record[key] = float(out[key].detach())
        if not math.isfinite(record['loss']):
            raise FloatingPointError(f'LAM loss is not finite at step {step + 1}: {record}')
        history.append(record)
        if on_step is not None:
            on_step(record)
    model.eval()
    return history
