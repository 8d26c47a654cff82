"""torch Datasets over a LeRobot v3.0 dataset, the form training consumes.

`ActionChunkDataset`: one item per frame: camera images, state, the next `horizon` actions
(padded past the episode's end by repeating the last action, with a mask), the instruction.
`FramePairDataset`: pairs of frames about `offset_s` apart within one episode, the input of the
latent action model.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from iflybot_vla_policy.data import lerobot_format as fmt
from iflybot_vla_policy.data.convert import resize_images
from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset


def _select_episodes(ds: LeRobotDataset, episodes: Sequence[int] | None,
                     success_only: bool) -> list[int]:
    chosen = list(range(ds.num_episodes)) if episodes is None else list(episodes)
    for e in chosen:
        if not 0 <= e < ds.num_episodes:
            raise IndexError(f'episode {e} out of range (dataset has {ds.num_episodes})')
    if success_only:
        chosen = [e for e in chosen if ds.episodes[e].get('success', True)]
    return chosen


class _EpisodeFrames(Dataset):
    """Items are frames of the selected episodes; `_frame(i)` gives (frame, episode, its end)."""

    ds: LeRobotDataset

    def _select(self, episodes: Sequence[int] | None, success_only: bool) -> None:
        self.episode_indices = _select_episodes(self.ds, episodes, success_only)
        frames = [np.arange(*self.ds.episode_range(e)) for e in self.episode_indices]
        self.frames = np.concatenate(frames) if frames else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.frames)

    def _frame(self, i: int) -> tuple[int, int, int]:
        frame = int(self.frames[i])
        episode = int(self.ds.data['episode_index'][frame])
        return frame, episode, self.ds.episode_range(episode)[1]


class ActionChunkDataset(_EpisodeFrames):
    """Frames with action chunks: item -> dict of tensors and the instruction string.

    images: {camera: uint8 (H, W, 3)}; state: float32 (state_dim,); actions: float32
    (horizon, action_dim); action_is_pad: bool (horizon,); instruction: str; plus indices.
    """

    def __init__(self, root: Path | str | LeRobotDataset, horizon: int,
                 cameras: Sequence[str] | None = None, image_size: tuple[int, int] | None = None,
                 episodes: Sequence[int] | None = None, success_only: bool = False,
                 load_images: bool = True) -> None:
        if horizon < 1:
            raise ValueError(f'horizon must be >= 1, got {horizon}')
        self.ds = root if isinstance(root, LeRobotDataset) else LeRobotDataset(root)
        self.horizon = horizon
        self.cameras = list(self.ds.cameras if cameras is None else cameras)
        for cam in self.cameras:
            if cam not in self.ds.cameras:
                raise KeyError(f'unknown camera {cam!r}; the dataset has {self.ds.cameras}')
        self.image_size = image_size
        self.load_images = load_images
        self._select(episodes, success_only)

    def __getitem__(self, i: int) -> dict[str, Any]:
        frame, episode, stop = self._frame(i)
        idx = np.arange(frame, frame + self.horizon)
        pad = idx >= stop
        idx = np.minimum(idx, stop - 1)
        item: dict[str, Any] = {
            'state': torch.from_numpy(self.ds.data[fmt.STATE_KEY][frame].copy()),
            'actions': torch.from_numpy(self.ds.data[fmt.ACTION_KEY][idx]),  # (horizon, A)
            'action_is_pad': torch.from_numpy(pad),
            'instruction': self.ds.instruction(frame),
            'episode_index': episode,
            'frame_index': int(self.ds.data['frame_index'][frame]),
            'index': frame,
        }
        if self.load_images:
            item['images'] = {cam: torch.from_numpy(
                resize_images(self.ds.images(cam, [frame]), self.image_size)[0])
                for cam in self.cameras}
        return item


class FramePairDataset(_EpisodeFrames):
    """Pairs (frame t, frame t + offset) of one camera within an episode, for the LAM.

    item -> {'frame': uint8 (H, W, 3), 'next_frame': uint8 (H, W, 3), 'offset_frames': int,
    'instruction': str, 'episode_index': int, 'frame_index': int}. Near the end of an episode
    the later frame is clipped to the episode's last frame.
    """

    def __init__(self, root: Path | str | LeRobotDataset, offset_s: float = 1.0,
                 camera: str | None = None, image_size: tuple[int, int] | None = None,
                 episodes: Sequence[int] | None = None, success_only: bool = False) -> None:
        self.ds = root if isinstance(root, LeRobotDataset) else LeRobotDataset(root)
        if not self.ds.cameras:
            raise ValueError(f'{self.ds.root} has no video features')
        self.camera = camera or self.ds.cameras[0]
        if self.camera not in self.ds.cameras:
            raise KeyError(f'unknown camera {self.camera!r}; the dataset has {self.ds.cameras}')
        self.offset = max(1, round(offset_s * self.ds.fps))
        self.image_size = image_size
        self._select(episodes, success_only)

    def __getitem__(self, i: int) -> dict[str, Any]:
        frame, episode, stop = self._frame(i)
        later = min(frame + self.offset, stop - 1)
        pair = resize_images(self.ds.images(self.camera, [frame, later]), self.image_size)
        return {'frame': torch.from_numpy(pair[0]), 'next_frame': torch.from_numpy(pair[1]),
                'offset_frames': later - frame, 'instruction': self.ds.instruction(frame),
                'episode_index': episode,
                'frame_index': int(self.ds.data['frame_index'][frame])}
