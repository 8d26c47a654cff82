"""rosbag2 MCAP bags without rosbag2: writing and reading through `rosbags`, with our own types.

A bag is a directory with `metadata.yaml` and one `.mcap` file, the layout `ros2 bag info/play`
reads on a full ROS 2 install. Messages are CDR bytes (as `rclpy.serialization` produces them);
this module never needs rclpy: types come from the Kilted typestore plus the `.msg` files of
`iflybot_vla_msgs`.
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iflybot_vla_policy.paths import repo_root

MSGS_PACKAGE = 'iflybot_vla_msgs'
EPISODE_INFO_TOPIC = '/episode_info'
EPISODE_INFO_TYPE = 'iflybot_vla_msgs/msg/EpisodeInfo'
CUSTOM_DATA_PREFIX = 'iflybot.'


class BagError(RuntimeError):
    """A bag that cannot be read or written; the message says which bag and why."""


def _msg_dirs() -> list[Path]:
    """Where the .msg files of iflybot_vla_msgs live: installed share/ dirs, then the checkout."""
    dirs = []
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if prefix:
            dirs.append(Path(prefix) / 'share' / MSGS_PACKAGE / 'msg')
    root = repo_root()
    if root is not None:
        dirs.append(root / 'src' / MSGS_PACKAGE / 'msg')
    return [d for d in dirs if d.is_dir()]


@functools.lru_cache(maxsize=1)
def typestore() -> Any:
    """The ROS 2 Kilted typestore with the messages of iflybot_vla_msgs registered."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    dirs = _msg_dirs()
    if not dirs:
        raise BagError(f'cannot find the .msg files of {MSGS_PACKAGE}: source env.sh '
                       '(AMENT_PREFIX_PATH) or run from a source checkout')
    types: dict[str, Any] = {}
    for path in sorted(dirs[0].glob('*.msg')):
        types.update(get_types_from_msg(path.read_text(), f'{MSGS_PACKAGE}/msg/{path.stem}'))
    store.register(types)
    return store


def check_msgtype(msgtype: str) -> str:
    """Validate a full type name ('sensor_msgs/msg/Image'); returns it or raises ValueError."""
    parts = msgtype.split('/')
    if len(parts) != 3 or parts[1] != 'msg' or not all(parts):
        raise ValueError(f"message type {msgtype!r} must look like 'pkg/msg/Type'")
    if msgtype not in typestore().fielddefs:
        raise ValueError(f'unknown message type {msgtype!r}: not in the Kilted typestore nor in '
                         f'{MSGS_PACKAGE}')
    return msgtype


class BagWriter:
    """One rosbag2 (version 9, MCAP storage) bag; topics are added on first write.

    Not thread-safe: the recorder calls it from its single writer thread.
    """

    def __init__(self, path: Path | str, compression: str = 'none') -> None:
        from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer

        self.path = Path(path)
        if self.path.exists():
            raise BagError(f'bag {self.path} already exists')
        self._writer = Writer(self.path, version=9, storage_plugin=StoragePlugin.MCAP)
        if compression == 'zstd':
            # Storage mode compresses each MCAP chunk: the bag stays a single .mcap file.
            self._writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        elif compression != 'none':
            raise ValueError(f"compression must be 'none' or 'zstd', got {compression!r}")
        self._writer.open()
        self._connections: dict[str, Any] = {}
        self.message_count = 0

    def add_topic(self, topic: str, msgtype: str) -> None:
        if topic in self._connections:
            if self._connections[topic].msgtype != msgtype:
                raise BagError(f'{self.path}: topic {topic} already recorded as '
                               f'{self._connections[topic].msgtype}, not {msgtype}')
            return
        self._connections[topic] = self._writer.add_connection(
            topic, check_msgtype(msgtype), typestore=typestore())

    def write(self, topic: str, msgtype: str, timestamp_ns: int, data: bytes) -> None:
        """Write one CDR-serialised message received at `timestamp_ns` (ns since epoch)."""
        if topic not in self._connections:
            self.add_topic(topic, msgtype)
        self._writer.write(self._connections[topic], int(timestamp_ns), data)
        self.message_count += 1

    def write_message(self, topic: str, msgtype: str, timestamp_ns: int, msg: Any) -> None:
        """Write a rosbags message object (e.g. EpisodeInfo built by `make_message`)."""
        self.write(topic, msgtype, timestamp_ns, bytes(typestore().serialize_cdr(msg, msgtype)))

    def flush(self) -> None:
        """Put every message written so far into the file (the OS's page cache).

        rosbags holds the open MCAP chunk in memory until it passes 1 MiB, which is seconds of
        joint states and camera frames that a SIGKILL or a power cut would take with it. This
        closes that chunk early (with its message index, so a repair can count its messages)
        and flushes the file; `bag-repair` recovers everything flushed.
        """
        storage = self._writer.storage      # rosbags' McapWriter (rosbags 0.11, pinned)
        if storage is None:
            return
        if storage.chunk.msgs:              # schema/channel records alone wait for a message
            storage.close_chunk()
        storage.bio.flush()

    def set_custom_data(self, data: Mapping[str, str]) -> None:
        for key, value in data.items():
            self._writer.set_custom_data(f'{CUSTOM_DATA_PREFIX}{key}', str(value))

    def close(self) -> None:
        """Write the MCAP summary and footer, then metadata.yaml."""
        if self._writer.storage is not None:
            self._writer.close()

    def abort(self) -> None:
        """Stop without a footer or metadata.yaml (what a crash leaves); for tests and bench."""
        self._writer.abort()


def make_message(msgtype: str, **fields: Any) -> Any:
    """A rosbags message object of `msgtype` with the given fields (e.g. EpisodeInfo)."""
    return typestore().types[msgtype](**fields)


def episode_info_message(info: Mapping[str, Any]) -> Any:
    """EpisodeInfo from a dict with its field names; missing fields get their defaults."""
    defaults = {'episode_id': '', 'task': '', 'instruction': '', 'success': False,
                'operator_name': '', 'robot': '', 'duration': 0.0}
    unknown = sorted(set(info) - set(defaults))
    if unknown:
        raise ValueError(f'unknown EpisodeInfo field(s) {unknown}; valid: {list(defaults)}')
    values = {**defaults, **info}
    values['success'] = bool(values['success'])
    values['duration'] = float(values['duration'])
    return make_message(EPISODE_INFO_TYPE, **values)


def deserialize(data: bytes, msgtype: str) -> Any:
    """CDR bytes -> rosbags message object.

    Tolerates trailing bytes: rclpy's serializer pads its buffer (8 bytes after a JointState),
    which `Typestore.deserialize_cdr` rejects as a size mismatch.
    """
    store = typestore()
    if len(data) < 4 or data[:2] not in (b'\x00\x00', b'\x00\x01'):
        raise BagError(f'{msgtype}: not CDR data (bad encapsulation header)')
    msgdef = store.get_msgdef(msgtype)
    func = msgdef.deserialize_cdr_le if data[1] else msgdef.deserialize_cdr_be
    try:
        message, _pos = func(memoryview(data)[4:], 0, msgdef.cls, store)
    except Exception as err:
        raise BagError(f'cannot deserialize a {msgtype}: {err}') from err
    return message


@dataclass(frozen=True)
class BagMessage:
    topic: str
    msgtype: str
    timestamp_ns: int      # receive time (the bag's log time)
    data: bytes            # CDR bytes

    def decode(self) -> Any:
        return deserialize(self.data, self.msgtype)


@dataclass(frozen=True)
class BagSummary:
    path: Path
    message_count: int
    topics: dict[str, tuple[str, int]]   # topic -> (type, count)
    start_ns: int
    duration_ns: int
    custom_data: dict[str, str]


def _check_bag_dir(path: Path) -> None:
    if not path.exists():
        raise BagError(f'bag {path} does not exist')
    if not path.is_dir():
        raise BagError(f'bag {path} is not a directory (a rosbag2 bag is a directory with '
                       'metadata.yaml and .mcap files)')
    if not (path / 'metadata.yaml').is_file():
        hint = (f"; run 'iflybot bag-repair {path}' to rebuild it"
                if any(path.glob('*.mcap')) else '')
        raise BagError(f'bag {path} has no metadata.yaml (recording cut off?){hint}')


def summary(path: Path | str) -> BagSummary:
    """Topics, counts and custom data of a bag from its metadata.yaml (no message reads)."""
    import yaml
    from rosbags.rosbag2 import Reader

    path = Path(path)
    _check_bag_dir(path)
    try:
        with Reader(path) as reader:
            topics = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
            meta = yaml.safe_load((path / 'metadata.yaml').read_text())
            custom = dict(meta['rosbag2_bagfile_information'].get('custom_data') or {})
            return BagSummary(path, reader.message_count, topics, reader.start_time,
                              reader.duration, custom)
    except BagError:
        raise
    except Exception as err:  # rosbags raises several types for broken bags
        raise BagError(f'cannot read bag {path}: {err}') from err


def read_messages(path: Path | str, topics: set[str] | None = None) -> Iterator[BagMessage]:
    """All messages of a bag in log-time order (optionally only `topics`), as CDR bytes.

    Raises BagError, after the last readable message, when the bag holds fewer messages than
    its metadata counts: rosbags skips the rest of a damaged chunk without a word.
    """
    from rosbags.rosbag2 import Reader

    path = Path(path)
    _check_bag_dir(path)
    repair = f'`iflybot bag-repair {path}` keeps the readable messages and counts the rest'
    try:
        with Reader(path) as reader:
            connections = [c for c in reader.connections if topics is None or c.topic in topics]
            if not connections:   # rosbags reads every topic when given an empty list
                return
            read: Counter[int] = Counter()
            for conn, timestamp, data in reader.messages(connections=connections):
                read[conn.id] += 1
                yield BagMessage(conn.topic, conn.msgtype, timestamp, bytes(data))
            missing = {c.topic: c.msgcount - read[c.id] for c in connections
                       if read[c.id] < c.msgcount}
    except BagError:
        raise
    except Exception as err:  # rosbags on damaged bytes: OverflowError, ReaderError, ...
        raise BagError(f'cannot read bag {path}: its .mcap is damaged or not a rosbag2 MCAP '
                       f'file ({type(err).__name__}: {err}); {repair}') from err
    if missing:
        expected = sum(c.msgcount for c in connections)
        detail = ', '.join(f'{t} {n}' for t, n in sorted(missing.items()))
        raise BagError(f'bag {path} is damaged: {sum(missing.values())} of {expected} messages '
                       f'unreadable ({detail}); {repair}')


def read_episode_info(path: Path | str) -> dict[str, Any]:
    """The last EpisodeInfo stored in the bag, as a dict; custom_data as a fallback."""
    info: dict[str, Any] = {}
    for msg in read_messages(path, {EPISODE_INFO_TOPIC}):
        m = msg.decode()
        info = {k: getattr(m, k) for k in ('episode_id', 'task', 'instruction', 'success',
                                           'operator_name', 'robot', 'duration')}
    if not info:
        custom = summary(path).custom_data
        for key, value in custom.items():
            if key.startswith(CUSTOM_DATA_PREFIX):
                info[key[len(CUSTOM_DATA_PREFIX):]] = value
        if 'success' in info:
            info['success'] = str(info['success']).lower() == 'true'
    return info
