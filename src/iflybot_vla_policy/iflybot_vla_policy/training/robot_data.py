"""Robot demonstrations as the model sees them: chunks, normalisation statistics, FAST inputs.

Shared by the `fast` and `vla` stages so both normalise exactly as `Policy` does at inference
(`transforms.Transforms`: joint actions relative to the current joints, then per-dimension
statistics over every real step of every chunk).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from iflybot_vla_policy.data import lerobot_format as fmt
from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset
from iflybot_vla_policy.transforms import NormStats, NormStatsSet, Transforms


@dataclass
class RobotFrames:
    """Per-frame arrays of one dataset (N frames) with the chunk of actions after each frame."""

    dataset: LeRobotDataset
    state: np.ndarray          # (N, 8) float32
    actions: np.ndarray        # (N, 8) float32, the dataset's per-frame actions
    chunk_index: np.ndarray    # (N, H) int64 frame index of each chunk step (clipped)
    chunk_mask: np.ndarray     # (N, H) bool, False where the chunk ran past its episode
    episode: np.ndarray        # (N,) int64

    @property
    def chunks(self) -> np.ndarray:
        """(N, H, 8) robot actions of every frame's chunk (padding repeats the last action)."""
        return self.actions[self.chunk_index]


def robot_frames(ds: LeRobotDataset, horizon: int, success_only: bool = True) -> RobotFrames:
    """Frames of the (successful) episodes of `ds` with their action chunks of `horizon`."""
    keep = [e for e in range(ds.num_episodes)
            if not success_only or ds.episodes[e].get('success', True)]
    if not keep:
        raise ValueError(f'{ds.root}: no (successful) episodes to train on')
    frames, index, mask, episode = [], [], [], []
    for e in keep:
        start, stop = ds.episode_range(e)
        f = np.arange(start, stop)
        steps = f[:, None] + np.arange(horizon)[None]                  # (T, H)
        frames.append(f)
        index.append(np.minimum(steps, stop - 1))
        mask.append(steps < stop)
        episode.append(np.full(len(f), e))
    f = np.concatenate(frames)
    state = ds.data[fmt.STATE_KEY]
    actions = ds.data[fmt.ACTION_KEY]
    if state.shape[1] != 8 or actions.shape[1] != 8:
        raise ValueError(f'{ds.root}: expected 8-D state and joint actions (7 joints + gripper), '
                         f'got {state.shape[1]} and {actions.shape[1]}')
    rf = RobotFrames(ds, state, actions, np.zeros((ds.num_frames, horizon), np.int64),
                     np.zeros((ds.num_frames, horizon), bool), np.full(ds.num_frames, -1))
    rf.chunk_index[f] = np.concatenate(index)
    rf.chunk_mask[f] = np.concatenate(mask)
    rf.episode[f] = np.concatenate(episode)
    return rf


def used_frames(rf: RobotFrames) -> np.ndarray:
    """Global indices of the frames that belong to kept episodes."""
    return np.nonzero(rf.episode >= 0)[0]


def compute_norm_stats(frames: Sequence[RobotFrames], transforms: Transforms,
                       mode: str) -> NormStatsSet:
    """Statistics of the model-space state and actions over all kept frames / real steps."""
    states, actions = [], []
    for rf in frames:
        idx = used_frames(rf)
        states.append(rf.state[idx])
        model_space = transforms.actions_to_model_space(rf.chunks[idx], rf.state[idx])
        actions.append(model_space[rf.chunk_mask[idx]])                # (steps, 8)
    return NormStatsSet(NormStats.from_data(np.concatenate(states)),
                        NormStats.from_data(np.concatenate(actions)), mode)


def normalised_chunks(rf: RobotFrames, transforms: Transforms,
                      frames: np.ndarray | None = None) -> np.ndarray:
    """(n, H, robot_action_dim) normalised model-space chunks (unpadded width) of `frames`."""
    idx = used_frames(rf) if frames is None else np.asarray(frames)
    a = transforms.actions_to_model(rf.chunks[idx], rf.state[idx])
    return a[..., :transforms.cfg.robot_action_dim]


def norm_stats_close(a: NormStatsSet, b: NormStatsSet, tol: float = 1e-4) -> bool:
    return a.mode == b.mode and all(
        np.allclose(getattr(x, k), getattr(y, k), atol=tol, rtol=tol)
        for x, y in ((a.state, b.state), (a.actions, b.actions))
        for k in ('mean', 'std', 'q01', 'q99'))
