"""Episode recording without ROS: serialized messages in, one finalised bag per episode out.

Callers (the recorder node's subscription callbacks) only enqueue bytes: `put` never blocks and
never touches the disk. A single writer thread drains a bounded queue into the bag; when the
queue is full (disk slower than the sensors) messages are dropped and counted per topic, and the
count is reported when the episode stops. An index of all finalised episodes is kept as JSON
lines in `<root>/episodes.jsonl`.

Flush policy: the writer thread puts what it has written into the file at most
`flush_period_s` after the first message not yet there (one MCAP chunk per flush), so a
recorder killed without a chance to finalise (SIGKILL, OOM, a crash) loses at most that window
plus whatever waits in the queue; `iflybot bag-repair` recovers the rest (docs/recording.md).
"""
from __future__ import annotations

import datetime as dt
import json
import queue
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iflybot_vla_policy.data import bags

INDEX_FILE = 'episodes.jsonl'


@dataclass(frozen=True)
class RecorderConfig:
    root: Path
    compression: str = 'none'          # 'none' or 'zstd' (per MCAP chunk)
    min_free_disk_gb: float = 2.0      # refuse to start below this much free space
    queue_size: int = 2000             # messages waiting for the writer thread
    queue_max_mb: float = 1024.0       # bytes waiting for the writer thread
    robot: str = 'fr3'
    flush_period_s: float = 0.1        # written messages reach the file within this (s)

    def __post_init__(self) -> None:
        if self.compression not in ('none', 'zstd'):
            raise ValueError(f"compression must be 'none' or 'zstd', got {self.compression!r}")
        if self.queue_size < 1 or self.queue_max_mb <= 0:
            raise ValueError('queue_size and queue_max_mb must be positive')
        if self.min_free_disk_gb < 0:
            raise ValueError(f'min_free_disk_gb must be >= 0, got {self.min_free_disk_gb}')
        if not 0 <= self.flush_period_s <= 60:
            raise ValueError(f'flush_period_s must be within 0..60 s, got {self.flush_period_s}')


class RecorderError(RuntimeError):
    """A request the recorder cannot honour (already recording, disk full, ...)."""


@dataclass
class EpisodeResult:
    episode_id: str
    path: Path
    duration: float                      # s, on the caller's clock
    message_count: int                   # messages in the bag (EpisodeInfo included)
    dropped: dict[str, int] = field(default_factory=dict)   # topic -> dropped messages
    error: str = ''                      # writer failure, if any
    lost: dict[str, int] = field(default_factory=dict)      # topic -> lost before arrival

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        text = f'{self.message_count} messages in {self.duration:.1f} s to {self.path}'
        if self.dropped:
            detail = ', '.join(f'{t}: {n}' for t, n in sorted(self.dropped.items()))
            text += f'; dropped {self.dropped_total} ({detail})'
        else:
            text += '; dropped 0'
        if self.lost:
            detail = ', '.join(f'{t}: {n}' for t, n in sorted(self.lost.items()))
            text += f'; lost in transport {sum(self.lost.values())} ({detail})'
        if self.error:
            text += f'; writer error: {self.error}'
        return text


_STOP = object()


class _Episode:
    def __init__(self, episode_id: str, path: Path, info: dict[str, Any], start_ns: int,
                 writer: bags.BagWriter) -> None:
        self.episode_id = episode_id
        self.path = path
        self.info = info
        self.start_ns = start_ns
        self.writer = writer
        self.queue: queue.Queue = queue.Queue()
        self.queued_bytes = 0
        self.dropped: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.error = ''
        self.thread: threading.Thread | None = None
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')


class EpisodeRecorder:
    """Start/put/stop episodes; thread-safe (callbacks may run on several threads)."""

    def __init__(self, config: RecorderConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._episode: _Episode | None = None
        config.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------ control
    @property
    def recording(self) -> bool:
        return self._episode is not None

    @property
    def current_id(self) -> str:
        ep = self._episode
        return ep.episode_id if ep else ''

    def free_disk_gb(self) -> float:
        return shutil.disk_usage(self.config.root).free / 1e9

    def _next_id(self) -> str:
        stamp = dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')
        n = len(read_index(self.config.root))
        candidate = f'{stamp}_{n:04d}'
        while (self.config.root / candidate).exists():
            n += 1
            candidate = f'{stamp}_{n:04d}'
        return candidate

    def start(self, now_ns: int, task: str = '', instruction: str = '',
              operator_name: str = '') -> tuple[str, Path]:
        """Open a new episode bag; raises RecorderError when one is open or disk is low."""
        with self._lock:
            if self._episode is not None:
                raise RecorderError(f'already recording episode {self._episode.episode_id}; '
                                    'stop or discard it first')
            free = self.free_disk_gb()
            if free < self.config.min_free_disk_gb:
                raise RecorderError(f'only {free:.2f} GB free under {self.config.root}, below '
                                    f'min_free_disk_gb={self.config.min_free_disk_gb}')
            episode_id = self._next_id()
            path = self.config.root / episode_id
            writer = bags.BagWriter(path, compression=self.config.compression)
            info = {'episode_id': episode_id, 'task': task, 'instruction': instruction,
                    'operator_name': operator_name, 'robot': self.config.robot}
            ep = _Episode(episode_id, path, info, now_ns, writer)
            # The opening EpisodeInfo goes first, so even a bag cut off by a crash names its
            # episode; the closing one (success, duration) is written at stop.
            writer.write_message(bags.EPISODE_INFO_TOPIC, bags.EPISODE_INFO_TYPE, now_ns,
                                 bags.episode_info_message(info))
            writer.flush()
            ep.thread = threading.Thread(target=self._drain, args=(ep,), daemon=True,
                                         name=f'bag-writer-{episode_id}')
            ep.thread.start()
            self._episode = ep
            return episode_id, path

    def put(self, topic: str, msgtype: str, timestamp_ns: int, data: bytes) -> bool:
        """Enqueue one serialized message; False when dropped (full queue or no episode)."""
        ep = self._episode
        if ep is None:
            return False
        size = len(data)
        if ep.queue.qsize() >= self.config.queue_size or \
                ep.queued_bytes + size > self.config.queue_max_mb * 1e6 or ep.error:
            ep.dropped[topic] += 1
            return False
        ep.queued_bytes += size          # approximate under races; it bounds memory only
        ep.queue.put((topic, msgtype, timestamp_ns, data))
        return True

    def note_lost(self, topic: str, count: int) -> None:
        """Count messages the middleware reports lost before they reached the recorder."""
        ep = self._episode
        if ep is not None and count > 0:
            ep.lost[topic] += count

    def _drain(self, ep: _Episode) -> None:
        period = self.config.flush_period_s
        flush_at: float | None = None    # deadline of the oldest message not in the file yet
        while True:
            wait = None if flush_at is None else max(0.0, flush_at - time.monotonic())
            try:
                item = ep.queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                return                   # stop() closes the bag, discard() drops it
            if item is not None:
                self._write(ep, item)
                if flush_at is None and not ep.error:
                    flush_at = time.monotonic() + period
            if flush_at is not None and time.monotonic() >= flush_at:
                flush_at = None
                try:
                    ep.writer.flush()
                except Exception as err:  # disk full: stop writing, keep counting
                    ep.error = ep.error or f'{type(err).__name__}: {err}'

    @staticmethod
    def _write(ep: _Episode, item: tuple[str, str, int, bytes]) -> None:
        topic, msgtype, timestamp_ns, data = item
        ep.queued_bytes -= len(data)
        if ep.error:
            ep.dropped[topic] += 1
            return
        try:
            ep.writer.write(topic, msgtype, timestamp_ns, data)
        except Exception as err:  # disk full, bad type: stop writing, keep counting
            ep.error = f'{type(err).__name__}: {err}'
            ep.dropped[topic] += 1

    def _finish(self, ep: _Episode) -> None:
        ep.queue.put(_STOP)
        assert ep.thread is not None
        ep.thread.join()

    def stop(self, now_ns: int, success: bool, notes: str = '') -> EpisodeResult:
        """Flush the queue, write the final EpisodeInfo and metadata, index the episode."""
        with self._lock:
            ep = self._episode
            if ep is None:
                raise RecorderError('not recording: start an episode first')
            self._episode = None
        self._finish(ep)
        duration = max(0, now_ns - ep.start_ns) / 1e9
        info = {**ep.info, 'success': bool(success), 'duration': duration}
        try:
            ep.writer.write_message(bags.EPISODE_INFO_TOPIC, bags.EPISODE_INFO_TYPE,
                                    max(now_ns, ep.start_ns), bags.episode_info_message(info))
            ep.writer.set_custom_data({**{k: str(v) for k, v in info.items()}, 'notes': notes,
                                       'dropped': str(sum(ep.dropped.values())),
                                       'lost': str(sum(ep.lost.values()))})
            ep.writer.close()
        except Exception as err:
            ep.error = ep.error or f'{type(err).__name__}: {err}'
        result = EpisodeResult(ep.episode_id, ep.path, duration, ep.writer.message_count,
                               dict(ep.dropped), ep.error, dict(ep.lost))
        entry = {**info, 'path': ep.path.name, 'message_count': result.message_count,
                 'dropped': result.dropped_total, 'lost': sum(result.lost.values()),
                 'notes': notes,
                 'started_at': ep.started_at,
                 'error': ep.error}
        with (self.config.root / INDEX_FILE).open('a') as f:
            f.write(json.dumps(entry) + '\n')
        return result

    def discard(self) -> str:
        """Drop the open episode and delete its bag; returns its id."""
        with self._lock:
            ep = self._episode
            if ep is None:
                raise RecorderError('not recording: nothing to discard')
            self._episode = None
        self._finish(ep)
        ep.writer.abort()
        shutil.rmtree(ep.path, ignore_errors=True)
        return ep.episode_id

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until the writer thread has drained the queue (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ep = self._episode
            if ep is None or ep.queue.qsize() == 0:
                return True
            time.sleep(0.005)
        return False


def read_index(root: Path | str) -> list[dict[str, Any]]:
    """The episodes recorded under `root`, oldest first."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
