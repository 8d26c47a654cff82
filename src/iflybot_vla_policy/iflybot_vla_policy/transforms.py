"""Input/output transforms between the robot's numpy world and the model's tensors.

Robot side (FR3): state (8,) = 7 joint positions (rad) + gripper opening width (m); actions in
joint mode (H, 8) absolute joint targets + gripper width, in end-effector mode (H, 7) TCP delta
position (m) + rotation vector (rad) + gripper width. Model side: normalised (mean/std or
quantile), joint actions optionally relative to the current joints, zero-padded to the model's
widths. Images: any size -> letterboxed square of the model's size, RGB float in [0, 1].
One robot = one transform; the model never sees robot specifics.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from iflybot_vla_policy.config import ROBOT_STATE_DIM, VLAConfig

NORM_MODES = ('mean_std', 'quantile')
# The arm's joint positions in a state or joint-mode action: all but the last, the gripper width.
ARM_JOINTS = slice(0, ROBOT_STATE_DIM - 1)


@dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one quantity (robot dims, unpadded)."""

    mean: np.ndarray   # (D,)
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray

    @classmethod
    def from_data(cls, x: np.ndarray) -> NormStats:
        """x: (..., D) samples."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
        return cls(mean=x.mean(0), std=x.std(0), q01=np.quantile(x, 0.01, axis=0),
                   q99=np.quantile(x, 0.99, axis=0))

    @classmethod
    def identity(cls, dim: int) -> NormStats:
        return cls(mean=np.zeros(dim), std=np.ones(dim), q01=-np.ones(dim), q99=np.ones(dim))

    @property
    def dim(self) -> int:
        return len(self.mean)

    def normalize(self, x: np.ndarray, mode: str) -> np.ndarray:
        if mode == 'quantile':  # [q01, q99] -> [-1, 1]
            return 2 * (x - self.q01) / np.maximum(self.q99 - self.q01, 1e-6) - 1
        return (x - self.mean) / np.maximum(self.std, 1e-6)

    def unnormalize(self, x: np.ndarray, mode: str) -> np.ndarray:
        if mode == 'quantile':
            return (x + 1) / 2 * np.maximum(self.q99 - self.q01, 1e-6) + self.q01
        return x * np.maximum(self.std, 1e-6) + self.mean

    def to_json(self) -> dict:
        return {k: np.asarray(getattr(self, k)).tolist() for k in ('mean', 'std', 'q01', 'q99')}

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> NormStats:
        arrays = {}
        for key in ('mean', 'std', 'q01', 'q99'):
            if key not in data:
                raise ValueError(f"{where}: missing key '{key}'")
            arr = np.asarray(data[key], dtype=np.float64)
            if arr.ndim != 1 or not np.all(np.isfinite(arr)):
                raise ValueError(f'{where}.{key}: must be a finite 1-D list')
            arrays[key] = arr
        if len({a.shape for a in arrays.values()}) != 1:
            raise ValueError(f'{where}: mean/std/q01/q99 lengths differ')
        return cls(**arrays)


@dataclass(frozen=True)
class NormStatsSet:
    """Statistics of the model-space state and actions (after the action-space transform)."""

    state: NormStats
    actions: NormStats
    mode: str = 'mean_std'

    @classmethod
    def identity(cls, cfg: VLAConfig) -> NormStatsSet:
        return cls(NormStats.identity(ROBOT_STATE_DIM), NormStats.identity(cfg.robot_action_dim))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({'mode': self.mode, 'state': self.state.to_json(),
                                    'actions': self.actions.to_json()}, indent=1))

    @classmethod
    def load(cls, path: Path, cfg: VLAConfig | None = None) -> NormStatsSet:
        if not path.is_file():
            raise FileNotFoundError(f'normalisation stats not found: {path}')
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f'{path}: not valid JSON ({err})') from None
        for key in ('state', 'actions'):
            if key not in data:
                raise ValueError(f"{path}: missing key '{key}'")
        mode = data.get('mode', 'mean_std')
        if mode not in NORM_MODES:
            raise ValueError(f"{path}: key 'mode' must be one of {NORM_MODES}, got {mode!r}")
        out = cls(NormStats.from_json(data['state'], f'{path}: state'),
                  NormStats.from_json(data['actions'], f'{path}: actions'), mode)
        if cfg is not None:
            if out.state.dim != ROBOT_STATE_DIM:
                raise ValueError(f"{path}: key 'state' has {out.state.dim} dims, expected "
                                 f'{ROBOT_STATE_DIM}')
            if out.actions.dim != cfg.robot_action_dim:
                raise ValueError(f"{path}: key 'actions' has {out.actions.dim} dims, expected "
                                 f'{cfg.robot_action_dim} for action space {cfg.action.space!r}')
        return out


def resize_pad(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W, 3) RGB of any size -> float (3, size, size) in [0, 1], aspect kept, padded
    with black (letterbox, as openpi's resize_with_pad)."""
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode='bilinear', align_corners=False,
                          antialias=nh < h or nw < w).clamp(0, 1)
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(x, (left, size - nw - left, top, size - nh - top))[0]


def pad_last(x: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad the last axis to `dim`."""
    extra = dim - x.shape[-1]
    if extra < 0:
        raise ValueError(f'cannot pad width {x.shape[-1]} down to {dim}')
    return np.concatenate([x, np.zeros((*x.shape[:-1], extra), dtype=x.dtype)], axis=-1)


class Transforms:
    """Robot <-> model conversions for one config (action space) and one robot (gripper)."""

    def __init__(self, cfg: VLAConfig, norm: NormStatsSet | None = None,
                 gripper_max_width: float | None = None) -> None:
        self.cfg = cfg
        self.norm = norm or NormStatsSet.identity(cfg)
        if gripper_max_width is None:
            from iflybot_vla_policy.robot import load_robot
            gripper_max_width = load_robot('fr3').gripper.max_width
        self.gripper_max_width = gripper_max_width

    # -- observations

    def validate(self, obs: Mapping) -> None:
        """Clear ValueErrors for malformed observations (never a cryptic tensor error later)."""
        if not isinstance(obs, Mapping):
            raise ValueError(f'observation must be a dict, got {type(obs).__name__}')
        for key in ('images', 'state', 'instruction'):
            if key not in obs:
                raise ValueError(f"observation is missing key '{key}'")
        images = obs['images']
        if not isinstance(images, Mapping):
            raise ValueError("observation 'images' must be a dict camera name -> uint8 (H, W, 3)")
        for cam in self.cfg.cameras:
            if cam not in images:
                raise ValueError(f"observation is missing camera '{cam}' (have "
                                 f'{sorted(images)}; expected {list(self.cfg.cameras)})')
            img = images[cam]
            if not isinstance(img, np.ndarray):
                raise ValueError(f"image '{cam}' must be a numpy array, got {type(img).__name__}")
            if img.dtype != np.uint8:
                raise ValueError(f"image '{cam}' must be uint8 RGB, got dtype {img.dtype}")
            if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
                raise ValueError(f"image '{cam}' must have shape (H, W, 3), got {img.shape}")
        state = obs['state']
        if not isinstance(state, np.ndarray) or not np.issubdtype(state.dtype, np.floating):
            raise ValueError('observation state must be a float numpy array of shape '
                             f'({ROBOT_STATE_DIM},)')
        if state.shape != (ROBOT_STATE_DIM,):
            raise ValueError(f'observation state must have shape ({ROBOT_STATE_DIM},) '
                             f'({ROBOT_STATE_DIM - 1} joints + gripper width), got {state.shape}')
        if not np.all(np.isfinite(state)):
            raise ValueError(f'observation state contains NaN/inf: {state.tolist()}')
        text = obs['instruction']
        if not isinstance(text, str) or not text.strip():
            raise ValueError('observation instruction must be a non-empty string')

    def images(self, images: Mapping[str, np.ndarray]) -> torch.Tensor:
        """-> (n_cam, 3, S, S) float in [0, 1], cameras in config order."""
        return torch.stack([resize_pad(images[c], self.cfg.image_size) for c in self.cfg.cameras])

    def state(self, state: np.ndarray) -> np.ndarray:
        """(..., 8) robot state -> (..., state_dim) normalised, padded, float32."""
        s = self.norm.state.normalize(np.asarray(state, dtype=np.float64), self.norm.mode)
        return pad_last(s, self.cfg.action.state_dim).astype(np.float32)

    # -- actions

    def _relative(self) -> bool:
        return self.cfg.action.space == 'joint' and self.cfg.action.relative_joints

    def actions_to_model_space(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Robot actions (..., H, A) -> model space before normalisation (joint deltas)."""
        a = np.asarray(actions, dtype=np.float64).copy()
        if a.shape[-1] != self.cfg.robot_action_dim:
            raise ValueError(f'actions must have {self.cfg.robot_action_dim} dims for action '
                             f'space {self.cfg.action.space!r}, got {a.shape[-1]}')
        if self._relative():
            a[..., ARM_JOINTS] -= np.asarray(state, dtype=np.float64)[..., None, ARM_JOINTS]
        return a

    def actions_to_model(self, actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Robot actions (..., H, A) -> normalised, padded (..., H, action_dim) targets."""
        a = self.norm.actions.normalize(self.actions_to_model_space(actions, state),
                                        self.norm.mode)
        return pad_last(a, self.cfg.action.action_dim).astype(np.float32)

    def actions_from_model(self, model_actions: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Model output (..., H, action_dim) -> robot actions (..., H, A) float32."""
        a = np.asarray(model_actions, dtype=np.float64)[..., :self.cfg.robot_action_dim]
        a = self.norm.actions.unnormalize(a, self.norm.mode)
        if self._relative():
            a[..., ARM_JOINTS] += np.asarray(state, dtype=np.float64)[..., None, ARM_JOINTS]
        a[..., -1] = np.clip(a[..., -1], 0.0, self.gripper_max_width)  # gripper width, m
        return a.astype(np.float32)
