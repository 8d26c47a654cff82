"""Stage `lam`: train the latent action model on frame pairs ~1 s apart from dataset videos.

The LAM is trained without action labels; its codes later become the VLM's latent-action
targets. It runs through the shared Trainer (accelerate, checkpoints, exact resume, curves);
`model/lam.py`'s `train_lam` is the same objective as a plain loop without those.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset
from iflybot_vla_policy.model.lam import LAMConfig, LatentActionModel
from iflybot_vla_policy.training.common import (
    FINAL,
    dataclass_from_section,
    model_config,
    open_datasets,
    output_dir,
)
from iflybot_vla_policy.training.config import TrainConfig
from iflybot_vla_policy.training.frames import decode_camera, square_resize
from iflybot_vla_policy.training.trainer import Trainer

LOGGED = ('loss', 'recon', 'commit', 'usage', 'perplexity')


def pair_indices(ds: LeRobotDataset, gap_frames: int) -> np.ndarray:
    """(M, 2) global frame indices (t, t + gap) within each episode, the later one clipped to the
    episode's last frame (so the last second of an episode pairs with its final frame)."""
    rows = []
    for e in range(ds.num_episodes):
        start, stop = ds.episode_range(e)
        t = np.arange(start, stop)
        rows.append(np.stack([t, np.minimum(t + gap_frames, stop - 1)], axis=1))
    return np.concatenate(rows).astype(np.int64)


class FramePairs(Dataset):
    """Decoded frame pairs: item -> {'frame', 'next_frame'}: uint8 (S, S, 3) each."""

    def __init__(self, frames: list[np.ndarray], pairs: list[np.ndarray]) -> None:
        self.frames = frames                 # per dataset: (num_frames, S, S, 3) uint8
        self.index = np.concatenate([np.concatenate(
            [np.full((len(p), 1), d), p], axis=1) for d, p in enumerate(pairs)])  # (M, 3)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d, t, tp = (int(v) for v in self.index[i])
        return {'frame': torch.from_numpy(self.frames[d][t]),
                'next_frame': torch.from_numpy(self.frames[d][tp])}


def build_pairs(cfg: TrainConfig, image_size: int, progress: bool = False) -> FramePairs:
    frames, pairs = [], []
    for ds in open_datasets(cfg):
        if cfg.data.camera not in ds.cameras:
            raise ValueError(f"data.camera '{cfg.data.camera}' is not in {ds.root} "
                             f'(cameras: {ds.cameras})')
        gap = max(1, round(cfg.data.frame_gap_s * ds.fps))
        frames.append(decode_camera(ds, cfg.data.camera, square_resize(image_size),
                                    progress=progress))
        pairs.append(pair_indices(ds, gap))
    return FramePairs(frames, pairs)


class LAMObjective(torch.nn.Module):
    """The LAM behind the trainer's protocol: scalar losses and code statistics only."""

    def __init__(self, lam: LatentActionModel) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.lam(batch['frame'], batch['next_frame'])
        return {k: out[k] for k in LOGGED}


def lam_config(cfg: TrainConfig) -> LAMConfig:
    tokens = model_config(cfg).tokens
    return dataclass_from_section(LAMConfig, cfg.lam, 'lam', n_tokens=tokens.latent_tokens,
                                  codebook_size=tokens.latent_codebook)


def export_lam(trainer: Trainer, config: LAMConfig, directory: Path) -> None:
    """Save the (EMA) weights as a directory that `LatentActionModel.load` reads (call on every
    process: gathering the weights is collective under FSDP)."""
    state = trainer.export_state_dict()
    if trainer.is_main:
        lam = LatentActionModel(config)
        lam.load_state_dict({k.removeprefix('lam.'): v for k, v in state.items()})
        lam.save(directory)


def run_lam(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the LAM; the result is `output_dir/final` (lam_config.json +
    lam.safetensors). Returns a summary with the final metrics."""
    out = output_dir(cfg)
    config = lam_config(cfg)
    torch.manual_seed(cfg.trainer.seed)
    data = build_pairs(cfg, config.image_size, progress=cfg.trainer.progress)
    model = LAMObjective(LatentActionModel(config))

    trainer = Trainer(model, data, cfg.trainer, out,
                      on_checkpoint=lambda step, tr: export_lam(tr, config, out / FINAL))
    result = trainer.fit()
    if not (out / FINAL / 'lam.safetensors').is_file():
        export_lam(trainer, config, out / FINAL)
    last = result.history[-1] if result.history else {}
    return {'stage': 'lam', 'steps': result.steps, 'pairs': len(data), 'final': str(out / FINAL),
            **{k: last.get(k) for k in LOGGED}}
