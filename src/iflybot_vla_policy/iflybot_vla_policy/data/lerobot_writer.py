"""Write episodes to a LeRobot v3.0 dataset (parquet frames, mp4 videos, meta/).

Used by `iflybot bag2dataset` (episodes from bags) and by `iflybot gen-demos` (episodes straight
from the simulator), so both produce the same format.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iflybot_vla_policy.data import lerobot_format as fmt
from iflybot_vla_policy.data.lerobot_format import EpisodeData
from iflybot_vla_policy.data.video import CODEC, PIX_FMT, VideoWriter


@dataclass(frozen=True)
class WriterConfig:
    fps: int = 30
    robot_type: str = 'fr3'
    state_names: tuple[str, ...] = ()       # default: fr3_joint1..7 + gripper_width
    data_file_mb: float = 100.0             # start a new data file beyond this size
    video_file_mb: float = 200.0            # start a new video file beyond this size
    crf: int = 18                           # H.264 quality: lower is better, 18 ~ lossless
    gop: int = 2                            # keyframe interval: random access decodes <= gop
    image_stats_stride: int = 10            # every k-th frame enters the image statistics

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f'fps must be positive, got {self.fps}')
        if self.gop < 1:
            raise ValueError(f'gop must be >= 1, got {self.gop}')


def _default_state_names() -> tuple[str, ...]:
    from iflybot_vla_policy.robot import load_robot

    return tuple(fmt.state_names(load_robot().arm_joint_names))


def numeric_stats(values: np.ndarray) -> dict[str, list[Any]]:
    """min/max/mean/std/count and quantiles per column of (N, D) values."""
    values = np.asarray(values, dtype=np.float64)
    out: dict[str, list[Any]] = {
        'min': values.min(0).tolist(), 'max': values.max(0).tolist(),
        'mean': values.mean(0).tolist(), 'std': values.std(0).tolist(),
        'count': [int(len(values))]}
    for q in fmt.QUANTILES:
        out[f'q{round(q * 100):02d}'] = np.quantile(values, q, axis=0).tolist()
    return out


class _ImageStats:
    """Per-channel statistics of images scaled to [0, 1], shaped (3, 1, 1) as LeRobot does."""

    def __init__(self) -> None:
        self.sum = np.zeros(3)
        self.sum_sq = np.zeros(3)
        self.min = np.full(3, np.inf)
        self.max = np.full(3, -np.inf)
        self.count = 0       # frames
        self.pixels = 0

    def add(self, frames: np.ndarray) -> None:   # (n, H, W, 3) uint8
        x = frames[:, ::4, ::4].reshape(-1, 3).astype(np.float64) / 255.0
        self.sum += x.sum(0)
        self.sum_sq += (x * x).sum(0)
        self.min = np.minimum(self.min, x.min(0))
        self.max = np.maximum(self.max, x.max(0))
        self.count += len(frames)
        self.pixels += len(x)

    def result(self) -> dict[str, Any]:
        mean = self.sum / max(self.pixels, 1)
        std = np.sqrt(np.maximum(self.sum_sq / max(self.pixels, 1) - mean * mean, 0.0))
        shape = lambda v: [[[float(c)]] for c in v]  # noqa: E731  (3,) -> (3, 1, 1)
        return {'min': shape(self.min), 'max': shape(self.max), 'mean': shape(mean),
                'std': shape(std), 'count': [self.count]}


class LeRobotWriter:
    """Accumulates episodes into a new dataset directory; `close()` writes the metadata."""

    def __init__(self, root: Path | str, config: WriterConfig = WriterConfig(),
                 overwrite: bool = False) -> None:
        import pyarrow  # noqa: F401  (fail early when missing)

        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise FileExistsError(f'dataset directory {self.root} is not empty '
                                      '(pass overwrite=True / --overwrite to replace it)')
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.names = list(config.state_names or _default_state_names())
        self._features: dict[str, dict[str, Any]] | None = None
        self._cameras: list[str] = []
        self._tasks: dict[str, int] = {}
        self._episodes: list[dict[str, Any]] = []
        self._numeric: dict[str, list[np.ndarray]] = {}
        self._image_stats: dict[str, _ImageStats] = {}
        self._frames = 0
        self._data_file = (0, 0)             # (chunk, file) of the open data parquet
        self._data_writer: Any = None
        self._videos: dict[str, VideoWriter] = {}
        self._video_file: dict[str, tuple[int, int]] = {}
        self._closed = False

    # ----------------------------------------------------------------------------- features
    def _init_features(self, ep: EpisodeData) -> None:
        state_dim, action_dim = ep.state.shape[1], ep.action.shape[1]
        if state_dim != len(self.names):
            raise ValueError(f'state has {state_dim} columns but {len(self.names)} state names '
                             f'are configured: {self.names}')
        action_names = self.names if action_dim == len(self.names) else [
            f'a{i}' for i in range(action_dim)]
        feats: dict[str, dict[str, Any]] = {}
        self._cameras = sorted(ep.images)
        for cam in self._cameras:
            _, h, w, _ = ep.images[cam].shape
            feats[fmt.image_key(cam)] = {
                'dtype': 'video', 'shape': [h, w, 3], 'names': ['height', 'width', 'channels'],
                'info': {'video.height': h, 'video.width': w, 'video.codec': 'h264',
                         'video.pix_fmt': PIX_FMT, 'video.is_depth_map': False,
                         'video.fps': self.config.fps, 'video.channels': 3,
                         'video.g': self.config.gop, 'video.crf': self.config.crf,
                         'video.encoder': CODEC, 'has_audio': False}}
        feats[fmt.STATE_KEY] = {'dtype': 'float32', 'shape': [state_dim], 'names': self.names}
        feats[fmt.ACTION_KEY] = {'dtype': 'float32', 'shape': [action_dim],
                                 'names': action_names}
        for key in sorted(ep.extra):
            feats[key] = {'dtype': 'float32', 'shape': [ep.extra[key].shape[1]], 'names': None}
        feats['timestamp'] = {'dtype': 'float32', 'shape': [1], 'names': None}
        for key in ('frame_index', 'episode_index', 'index', 'task_index'):
            feats[key] = {'dtype': 'int64', 'shape': [1], 'names': None}
        self._features = feats

    def _check_matches(self, ep: EpisodeData) -> None:
        assert self._features is not None
        if sorted(ep.images) != self._cameras:
            raise ValueError(f'episode {ep.episode_id!r} has cameras {sorted(ep.images)}, the '
                             f'dataset has {self._cameras}')
        for cam in self._cameras:
            want = self._features[fmt.image_key(cam)]['shape']
            if list(ep.images[cam].shape[1:]) != want:
                raise ValueError(f'episode {ep.episode_id!r}: {cam} frames are '
                                 f'{ep.images[cam].shape[1:]}, the dataset has {want}')
        for key, arr in ((fmt.STATE_KEY, ep.state), (fmt.ACTION_KEY, ep.action),
                         *ep.extra.items()):
            if key not in self._features or self._features[key]['shape'] != [arr.shape[1]]:
                raise ValueError(f'episode {ep.episode_id!r}: feature {key!r} with shape '
                                 f"{arr.shape[1:]} does not match the dataset's features")

    # ------------------------------------------------------------------------------ writing
    def _open_data_writer(self, table: Any) -> None:
        import pyarrow.parquet as pq

        chunk, file = self._data_file
        path = self.root / fmt.DATA_PATH.format(chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._data_writer = pq.ParquetWriter(str(path), table.schema, compression='snappy')
        self._data_path = path

    def _roll(self, loc: tuple[int, int]) -> tuple[int, int]:
        chunk, file = loc
        file += 1
        if file >= fmt.CHUNKS_SIZE:
            chunk, file = chunk + 1, 0
        return chunk, file

    def _frames_table(self, ep: EpisodeData, episode_index: int, task_index: int) -> Any:
        import pyarrow as pa

        t = ep.length
        cols: dict[str, Any] = {}
        for key, arr in ((fmt.STATE_KEY, ep.state), (fmt.ACTION_KEY, ep.action),
                         *sorted(ep.extra.items())):
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            cols[key] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
        cols['timestamp'] = pa.array(np.arange(t, dtype=np.float32) / np.float32(self.config.fps))
        cols['frame_index'] = pa.array(np.arange(t, dtype=np.int64))
        cols['episode_index'] = pa.array(np.full(t, episode_index, dtype=np.int64))
        cols['index'] = pa.array(np.arange(self._frames, self._frames + t, dtype=np.int64))
        cols['task_index'] = pa.array(np.full(t, task_index, dtype=np.int64))
        return pa.table(cols)

    def add_episode(self, ep: EpisodeData) -> int:
        """Append one episode; returns its episode_index."""
        if self._closed:
            raise RuntimeError('writer is closed')
        if self._features is None:
            self._init_features(ep)
        self._check_matches(ep)
        episode_index = len(self._episodes)
        task_index = self._tasks.setdefault(ep.instruction, len(self._tasks))
        table = self._frames_table(ep, episode_index, task_index)
        if self._data_writer is not None and \
                self._data_path.stat().st_size > self.config.data_file_mb * 1e6:
            self._data_writer.close()
            self._data_writer = None
            self._data_file = self._roll(self._data_file)
        if self._data_writer is None:
            self._open_data_writer(table)
        self._data_writer.write_table(table)

        record: dict[str, Any] = {
            'episode_index': episode_index, 'tasks': [ep.instruction], 'length': ep.length,
            'data/chunk_index': self._data_file[0], 'data/file_index': self._data_file[1],
            'dataset_from_index': self._frames, 'dataset_to_index': self._frames + ep.length}
        for cam in self._cameras:
            record.update(self._write_video(cam, ep.images[cam]))
        record.update({'meta/episodes/chunk_index': 0, 'meta/episodes/file_index': 0,
                       'episode_id': ep.episode_id, 'task_name': ep.task_name,
                       'success': bool(ep.success), 'operator_name': ep.operator_name,
                       'robot': ep.robot, 'seed': int(ep.seed)})
        for key, arr in ((fmt.STATE_KEY, ep.state), (fmt.ACTION_KEY, ep.action),
                         *sorted(ep.extra.items())):
            self._numeric.setdefault(key, []).append(np.asarray(arr, dtype=np.float32))
            stats = numeric_stats(arr)
            for stat in ('min', 'max', 'mean', 'std', 'count'):
                record[f'stats/{key}/{stat}'] = stats[stat]
        self._episodes.append(record)
        self._frames += ep.length
        return episode_index

    def _write_video(self, cam: str, frames: np.ndarray) -> dict[str, Any]:
        key = fmt.image_key(cam)
        writer = self._videos.get(cam)
        if writer is not None and writer.size_bytes() > self.config.video_file_mb * 1e6:
            writer.close()
            self._video_file[cam] = self._roll(self._video_file[cam])
            writer = None
        if writer is None:
            chunk, file = self._video_file.setdefault(cam, (0, 0))
            path = self.root / fmt.VIDEO_PATH.format(video_key=key, chunk_index=chunk,
                                                     file_index=file)
            _, h, w, _ = frames.shape
            writer = VideoWriter(path, self.config.fps, w, h, crf=self.config.crf,
                                 gop=self.config.gop)
            self._videos[cam] = writer
        start = writer.frame_count
        for frame in frames:
            writer.write(frame)
        self._image_stats.setdefault(key, _ImageStats()).add(
            frames[::self.config.image_stats_stride])
        chunk, file = self._video_file[cam]
        return {f'videos/{key}/chunk_index': chunk, f'videos/{key}/file_index': file,
                f'videos/{key}/from_timestamp': start / self.config.fps,
                f'videos/{key}/to_timestamp': writer.frame_count / self.config.fps}

    # ----------------------------------------------------------------------------- metadata
    def close(self) -> Path:
        """Finish the files and write meta/ (info, stats, tasks, episodes); returns the root."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._closed:
            return self.root
        self._closed = True
        if self._data_writer is not None:
            self._data_writer.close()
        for writer in self._videos.values():
            writer.close()
        if not self._episodes:
            raise ValueError(f'no episodes were written to {self.root}')
        meta = self.root / 'meta'
        meta.mkdir(exist_ok=True)

        episodes_path = self.root / fmt.EPISODES_PATH.format(chunk_index=0, file_index=0)
        episodes_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self._episodes), str(episodes_path))

        tasks = sorted(self._tasks.items(), key=lambda kv: kv[1])
        table = pa.table({'task_index': pa.array([i for _, i in tasks], pa.int64()),
                          'task': pa.array([t for t, _ in tasks], pa.string())})
        # LeRobot reads this file with pandas and expects the task string as the index.
        pandas_meta = {'index_columns': ['task'], 'column_indexes': [], 'columns': [
            {'name': 'task_index', 'field_name': 'task_index', 'pandas_type': 'int64',
             'numpy_type': 'int64', 'metadata': None},
            {'name': 'task', 'field_name': 'task', 'pandas_type': 'unicode',
             'numpy_type': 'object', 'metadata': None}],
            'creator': {'library': 'pyarrow', 'version': pa.__version__},
            'pandas_version': '2.2.3'}
        table = table.replace_schema_metadata({b'pandas': json.dumps(pandas_meta).encode()})
        pq.write_table(table, str(self.root / fmt.TASKS_PATH))

        stats: dict[str, Any] = {k: numeric_stats(np.concatenate(v))
                                 for k, v in self._numeric.items()}
        stats.update({k: s.result() for k, s in self._image_stats.items()})
        (self.root / fmt.STATS_PATH).write_text(json.dumps(stats, indent=2))

        assert self._features is not None
        info = {
            'codebase_version': fmt.CODEBASE_VERSION,
            'robot_type': self.config.robot_type,
            'total_episodes': len(self._episodes),
            'total_frames': self._frames,
            'total_tasks': len(self._tasks),
            'chunks_size': fmt.CHUNKS_SIZE,
            'data_files_size_in_mb': self.config.data_file_mb,
            'video_files_size_in_mb': self.config.video_file_mb,
            'fps': self.config.fps,
            'splits': {'train': f'0:{len(self._episodes)}'},
            'data_path': fmt.DATA_PATH,
            'video_path': fmt.VIDEO_PATH if self._cameras else None,
            'features': self._features,
        }
        (self.root / fmt.INFO_PATH).write_text(json.dumps(info, indent=2))
        return self.root

    def __enter__(self) -> LeRobotWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            if self._data_writer is not None:
                self._data_writer.close()
            for writer in self._videos.values():
                writer.close()


def write_dataset(root: Path | str, episodes: Iterable[EpisodeData],
                  config: WriterConfig = WriterConfig(), overwrite: bool = False,
                  state_names: Sequence[str] | None = None) -> Path:
    """Write in-memory episodes as a LeRobot v3.0 dataset at `root` (no ROS needed)."""
    if state_names is not None:
        from dataclasses import replace
        config = replace(config, state_names=tuple(state_names))
    with LeRobotWriter(root, config, overwrite=overwrite) as writer:
        for ep in episodes:
            writer.add_episode(ep)
    return Path(root)
