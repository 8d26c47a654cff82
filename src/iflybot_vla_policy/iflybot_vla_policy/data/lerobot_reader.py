"""Read a LeRobot v3.0 dataset: metadata, per-frame arrays and video frames (no torch here)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from iflybot_vla_policy.data import lerobot_format as fmt
from iflybot_vla_policy.data.video import VideoReader


class DatasetError(ValueError):
    """A dataset directory that is missing files or does not match the v3.0 format."""


def _fixed_list_to_numpy(column: Any) -> np.ndarray:
    """A (fixed-size) list column -> (N, D) float32."""
    import pyarrow as pa

    column = column.combine_chunks() if hasattr(column, 'combine_chunks') else column
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        return column.flatten().to_numpy(zero_copy_only=False).astype(
            np.float32).reshape(-1, width)
    return np.asarray(column.to_pylist(), dtype=np.float32)


class LeRobotDataset:
    """A dataset on disk; per-frame numeric features are loaded into memory, images on demand."""

    def __init__(self, root: Path | str) -> None:
        import pyarrow.parquet as pq

        self.root = Path(root)
        info_path = self.root / fmt.INFO_PATH
        if not info_path.is_file():
            raise DatasetError(f'{self.root} is not a LeRobot dataset: {fmt.INFO_PATH} missing')
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        version = self.info.get('codebase_version')
        if version != fmt.CODEBASE_VERSION:
            raise DatasetError(f'{self.root}: codebase_version {version!r}, this reader reads '
                               f'{fmt.CODEBASE_VERSION!r}')
        self.fps = int(self.info['fps'])
        self.features: dict[str, dict[str, Any]] = self.info['features']
        self.cameras = [k[len(fmt.IMAGE_PREFIX):] for k, f in self.features.items()
                        if k.startswith(fmt.IMAGE_PREFIX) and f['dtype'] == 'video']
        stats_path = self.root / fmt.STATS_PATH
        self.stats: dict[str, Any] = (json.loads(stats_path.read_text())
                                      if stats_path.is_file() else {})

        tasks = pq.read_table(str(self.root / fmt.TASKS_PATH)).to_pylist()
        self.tasks = {int(row['task_index']): row['task'] for row in tasks}

        episode_files = sorted((self.root / 'meta' / 'episodes').glob('chunk-*/file-*.parquet'))
        if not episode_files:
            raise DatasetError(f'{self.root}: no meta/episodes/*/*.parquet')
        self.episodes: list[dict[str, Any]] = []
        for path in episode_files:
            self.episodes.extend(pq.read_table(str(path)).to_pylist())
        self.episodes.sort(key=lambda e: e['episode_index'])

        numeric = [k for k, f in self.features.items()
                   if f['dtype'] not in ('video', 'image') and k not in fmt.INDEX_KEYS]
        data_files = sorted({(e['data/chunk_index'], e['data/file_index'])
                             for e in self.episodes})
        tables = []
        for chunk, file in data_files:
            path = self.root / self.info['data_path'].format(chunk_index=chunk, file_index=file)
            if not path.is_file():
                raise DatasetError(f'{self.root}: data file {path} is missing')
            tables.append(pq.read_table(str(path)))
        self.data: dict[str, np.ndarray] = {}
        for key in numeric:
            self.data[key] = np.concatenate([_fixed_list_to_numpy(t.column(key)) for t in tables])
        for key in fmt.INDEX_KEYS:
            self.data[key] = np.concatenate([t.column(key).to_numpy() for t in tables])
        order = np.argsort(self.data['index'], kind='stable')
        self.data = {k: v[order] for k, v in self.data.items()}
        total = int(self.info['total_frames'])
        if len(self.data['index']) != total:
            raise DatasetError(f'{self.root}: info.json says {total} frames, data files hold '
                               f'{len(self.data["index"])}')
        self._videos: dict[Path, VideoReader] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state['_videos'] = {}      # open decoders stay in the process that opened them
        return state

    # ------------------------------------------------------------------------------ queries
    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        return len(self.data['index'])

    def episode_range(self, episode_index: int) -> tuple[int, int]:
        """[from, to) global frame indices of one episode."""
        ep = self.episodes[episode_index]
        return int(ep['dataset_from_index']), int(ep['dataset_to_index'])

    def instruction(self, frame: int) -> str:
        return self.tasks[int(self.data['task_index'][frame])]

    def episode_arrays(self, episode_index: int) -> dict[str, np.ndarray]:
        start, stop = self.episode_range(episode_index)
        return {k: v[start:stop] for k, v in self.data.items()}

    def images(self, camera: str, frames: np.ndarray | list[int]) -> np.ndarray:
        """Frames (global indices) of one camera -> (n, H, W, 3) uint8."""
        if camera not in self.cameras:
            raise KeyError(f'unknown camera {camera!r}; the dataset has {self.cameras}')
        key = fmt.image_key(camera)
        frames = np.asarray(frames, dtype=np.int64)
        out = []
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for pos, frame in enumerate(frames):
            ep = self.episodes[int(self.data['episode_index'][frame])]
            path = self.root / self.info['video_path'].format(
                video_key=key, chunk_index=ep[f'videos/{key}/chunk_index'],
                file_index=ep[f'videos/{key}/file_index'])
            video_index = round(ep[f'videos/{key}/from_timestamp'] * self.fps) + int(
                self.data['frame_index'][frame])
            by_file.setdefault(path, []).append((pos, video_index))
        out = [None] * len(frames)
        for path, items in by_file.items():
            reader = self._videos.get(path)
            if reader is None:
                reader = self._videos[path] = VideoReader(path)
            decoded = reader.read([vi for _, vi in items])
            for (pos, _), img in zip(items, decoded, strict=True):
                out[pos] = img
        return np.stack(out)

    def close(self) -> None:
        for reader in self._videos.values():
            reader.close()
        self._videos.clear()
