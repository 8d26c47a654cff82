"""The LeRobot dataset format v3.0 as we write and read it: paths, feature keys, episode data.

Layout (LeRobot's documentation of v3.0): `meta/info.json`, `meta/stats.json`,
`meta/tasks.parquet`, `meta/episodes/chunk-000/file-000.parquet`,
`data/chunk-000/file-000.parquet` (many episodes per file), and
`videos/<video key>/chunk-000/file-000.mp4` (episodes concatenated; each episode's
`from_timestamp`/`to_timestamp` locate it in the file). LeRobot's "task" is the natural-language
instruction; our task name (pick_place, ...) is kept in the episodes table as `task_name`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CODEBASE_VERSION = 'v3.0'
CHUNKS_SIZE = 1000                      # files per chunk directory
DATA_PATH = 'data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet'
VIDEO_PATH = 'videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4'
EPISODES_PATH = 'meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet'
TASKS_PATH = 'meta/tasks.parquet'
INFO_PATH = 'meta/info.json'
STATS_PATH = 'meta/stats.json'

STATE_KEY = 'observation.state'
ACTION_KEY = 'action'
IMAGE_PREFIX = 'observation.images.'
INDEX_KEYS = ('timestamp', 'frame_index', 'episode_index', 'index', 'task_index')
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)


def image_key(camera: str) -> str:
    return f'{IMAGE_PREFIX}{camera}'


def state_names(arm_joints: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the state/action columns: the arm joints, then the gripper opening width."""
    return [*arm_joints, 'gripper_width']


@dataclass
class EpisodeData:
    """One episode in memory, at the dataset's frame rate (T frames).

    The contract between the producers (bag conversion, `gen-demos`) and the writer.
    """

    state: np.ndarray                       # (T, state_dim) float32: 7 joints + gripper width
    action: np.ndarray                      # (T, action_dim) float32: targets for each frame
    images: dict[str, np.ndarray]           # camera -> (T, H, W, 3) uint8 RGB
    instruction: str                        # natural-language instruction (LeRobot's "task")
    task_name: str = ''                     # e.g. pick_place
    success: bool = True
    episode_id: str = ''
    operator_name: str = ''
    robot: str = 'fr3'
    extra: dict[str, np.ndarray] = field(default_factory=dict)   # key -> (T, D) float32
    seed: int = -1                          # simulator seed, -1 when not from the simulator

    def __post_init__(self) -> None:
        t = len(self.state)
        if t == 0:
            raise ValueError(f'episode {self.episode_id!r} has no frames')
        if self.state.ndim != 2 or self.action.ndim != 2:
            raise ValueError(f'episode {self.episode_id!r}: state and action must be (T, D), got '
                             f'{self.state.shape} and {self.action.shape}')
        if len(self.action) != t:
            raise ValueError(f'episode {self.episode_id!r}: action has {len(self.action)} rows, '
                             f'state has {t}')
        for camera, frames in self.images.items():
            if frames.ndim != 4 or frames.shape[0] != t or frames.shape[3] != 3:
                raise ValueError(f'episode {self.episode_id!r}: images[{camera!r}] must be '
                                 f'({t}, H, W, 3), got {frames.shape}')
            if frames.dtype != np.uint8:
                raise ValueError(f'episode {self.episode_id!r}: images[{camera!r}] must be '
                                 f'uint8, got {frames.dtype}')
        for key, values in self.extra.items():
            if values.ndim != 2 or len(values) != t:
                raise ValueError(f'episode {self.episode_id!r}: extra[{key!r}] must be '
                                 f'({t}, D), got {values.shape}')

    @property
    def length(self) -> int:
        return len(self.state)
