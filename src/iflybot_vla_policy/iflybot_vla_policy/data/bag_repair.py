"""Recover a rosbag2 MCAP bag that a crash cut off or that has damaged bytes inside.

An MCAP file is a sequence of length-prefixed records, so everything readable can be found
without the summary section: this module scans the records (inside chunks too, zstd or not),
steps over damaged bytes to the next record whose fields add up, keeps every complete message
that still decodes, and writes a fresh, finalised bag in place of the broken one.

It also counts what it could not keep, because a repair that hides its losses is worse than
none: the unreadable bytes, the damaged chunks, and the lost messages. The count is exact when
the file's statistics record survived (the writer closed the file) and a lower bound otherwise
(a chunk's message index lists the messages it held; a cut-off tail tells nothing).
"""
from __future__ import annotations

import re
import shutil
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from iflybot_vla_policy.data import bags
from iflybot_vla_policy.data.bags import BagError, BagWriter, summary

MAGIC = b'\x89MCAP0\r\n'
OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK = 0x02, 0x03, 0x04, 0x05, 0x06
OP_MESSAGE_INDEX, OP_STATISTICS, OP_DATA_END = 0x07, 0x0B, 0x0F
_OPS = range(0x01, 0x10)                       # every opcode the MCAP spec defines
_CHUNK_OPS = (OP_SCHEMA, OP_CHANNEL, OP_MESSAGE)  # what a chunk may hold
# Records the scan can resynchronise on after damaged bytes: their fields must add up exactly.
_RESYNC = re.compile(b'[\\x02\\x06\\x07\\x0f]')

Message = tuple[int, int, bytes]               # (channel id, log time ns, CDR bytes)


@dataclass
class ScanResult:
    """What a record scan of one .mcap file found, and what it could not read."""

    schemas: dict[int, str] = field(default_factory=dict)        # schema id -> type name
    channels: dict[int, tuple[str, int]] = field(default_factory=dict)  # id -> (topic, schema)
    messages: list[Message] = field(default_factory=list)        # complete, decodable
    complete: bool = False      # reached the footer
    stopped_at: int = 0         # byte offset where the readable part ends
    reason: str = ''            # why the scan stopped early ('' when complete)
    problems: list[str] = field(default_factory=list)   # each damaged place, with its offset
    skipped_bytes: int = 0      # unreadable bytes stepped over (before the end)
    tail_bytes: int = 0         # bytes after the last readable record of a cut-off file
    chunks: int = 0             # chunk records found
    damaged_chunks: int = 0     # chunks with unreadable records, plus chunks not found at all
    indexed_lost: int = 0       # messages a message index lists that could not be read
    uncounted: bool = False     # some unreadable part held messages no index counts
    dropped: Counter = field(default_factory=Counter)   # topic -> complete but undecodable
    expected: dict[int, int] | None = None   # channel id -> messages (statistics record)
    expected_chunks: int | None = None

    @property
    def clean(self) -> bool:
        """Nothing unreadable: the footer reached, no damaged byte, every message decodes."""
        counts = Counter(cid for cid, _, _ in self.messages)
        return (self.complete and not self.problems and not self.dropped
                and (self.expected is None
                     or all(counts[c] == n for c, n in self.expected.items())))


@dataclass(frozen=True)
class RepairReport:
    path: Path
    repaired: bool              # False when the bag was already intact
    message_count: int
    topics: dict[str, int]      # topic -> recovered message count
    lost_bytes: int             # unreadable bytes dropped: damaged ranges plus a cut-off tail
    reason: str
    messages_expected: int | None = None   # the file's own count; None: unknown (cut off)
    messages_lost: int = 0      # exact when messages_expected is known, else a lower bound
    lost_topics: dict[str, int] = field(default_factory=dict)   # topic -> lost, where known
    damaged_chunks: int = 0
    cut_off: bool = False       # the file ends without a footer: its tail is gone uncounted
    uncounted: bool = False     # messages_lost is a lower bound: some damage has no count

    def describe(self) -> str:
        """One line for the CLI: what was recovered, and everything that was not."""
        topics = ', '.join(f'{t} {n}' for t, n in sorted(self.topics.items()))
        if self.messages_expected is not None:
            text = f'recovered {self.message_count} of {self.messages_expected} messages'
        else:
            text = f'recovered {self.message_count} messages'
        text += f' ({topics})'
        detail = ', '.join(f'{t} {n}' for t, n in sorted(self.lost_topics.items()))
        detail = f' ({detail})' if detail else ''
        where = 'after the cut' if self.cut_off else 'in the unreadable bytes'
        if self.messages_expected is not None or not self.uncounted:
            text += f'; lost {self.messages_lost} messages{detail}'
        elif self.messages_lost:
            text += (f'; lost at least {self.messages_lost} messages{detail} and an unknown '
                     f'number {where}')
        else:
            text += f'; lost an unknown number of messages {where}'
        if self.damaged_chunks:
            text += f'; {self.damaged_chunks} damaged chunk(s)'
        return text + f'; {self.lost_bytes} unreadable bytes dropped; cause: {self.reason}'


@dataclass
class _Chunk:
    """One chunk record while the message index records after it are read."""

    offset: int                      # file offset of the chunk record
    size: int                        # bytes of the record in the file
    data: bytes | None               # its records, uncompressed; None when undecodable
    problem: str = ''                # why part of it is unreadable
    readable_to: int = 0             # where the sequential record parse stopped
    covered: int = 0                 # bytes of the records read
    found: dict[int, Message] = field(default_factory=dict)     # record offset -> message
    indexed: dict[int, int] = field(default_factory=dict)       # record offset -> log time


def _string(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from('<I', buf, pos)
    if pos + 4 + n > len(buf):
        raise ValueError(f'string of {n} bytes overruns its record')
    return bytes(buf[pos + 4:pos + 4 + n]).decode(), pos + 4 + n


def _chunk_header(content: memoryview) -> tuple[int, int, int, int, str, int] | None:
    """(start, end, uncompressed size, crc, compression, records offset) of a chunk's content;
    None when its fields do not add up (damaged bytes, or not a chunk at all)."""
    if len(content) < 40:
        return None
    start, end, size, crc, n = struct.unpack_from('<QQQII', content, 0)
    if n > 16 or len(content) < 40 + n:
        return None
    try:
        compression = bytes(content[32:32 + n]).decode('ascii')
    except UnicodeDecodeError:
        return None
    (records,) = struct.unpack_from('<Q', content, 32 + n)
    if compression not in ('', 'zstd', 'lz4') or 40 + n + records != len(content):
        return None
    # end 0: a chunk of schemas and channels only (its start stays at the writer's maximum)
    if (start > end and end != 0) or (compression == '' and size != records):
        return None
    return start, end, size, crc, compression, 40 + n


def _record_at(buf: memoryview, pos: int) -> tuple[int, memoryview, int] | None:
    """(opcode, content, end offset) of the record at `pos`, or None when it cannot be one."""
    if pos + 9 > len(buf):
        return None
    op, length = struct.unpack_from('<BQ', buf, pos)
    end = pos + 9 + length
    if op not in _OPS or end > len(buf):
        return None
    content = buf[pos + 9:end]
    if op == OP_CHUNK and _chunk_header(content) is None:
        return None
    if op == OP_MESSAGE_INDEX and (length < 6 or (length - 6) % 16
                                   or struct.unpack_from('<I', content, 2)[0] != length - 6):
        return None
    if op == OP_DATA_END and length != 4:
        return None
    if op == OP_FOOTER and (length != 20 or bytes(buf[end:]) != MAGIC):
        return None
    return op, content, end


def _resync(buf: memoryview, data: bytes, start: int) -> int | None:
    """Offset of the next record after damaged bytes whose fields add up, or None."""
    for match in _RESYNC.finditer(data, start):
        if _record_at(buf, match.start()) is not None:
            return match.start()
    return None


def _decompress(compression: str, data: memoryview, size: int) -> bytes:
    if compression == '':
        return bytes(data)
    if compression == 'zstd':
        import zstandard
        return zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=size)
    raise BagError(f'unsupported MCAP chunk compression {compression!r}')


def _inner_records(data: bytes, start: int = 0) -> Iterator[tuple[int, memoryview, int, int]]:
    """(opcode, content, offset, end) of each chunk record from `start` while they parse."""
    buf, pos = memoryview(data), start
    while pos + 9 <= len(buf):
        op, length = struct.unpack_from('<BQ', buf, pos)
        end = pos + 9 + length
        if op not in _CHUNK_OPS or end > len(buf) or (op == OP_MESSAGE and length < 22):
            return
        yield op, buf[pos + 9:end], pos, end
        pos = end


def _definition(op: int, content: memoryview, result: ScanResult) -> None:
    """Record a schema or channel record; raises ValueError/struct.error when damaged."""
    if op == OP_SCHEMA:
        (sid,) = struct.unpack_from('<H', content, 0)
        result.schemas[sid], _ = _string(content, 2)
    elif op == OP_CHANNEL:
        cid, sid = struct.unpack_from('<HH', content, 0)
        topic, _ = _string(content, 4)
        result.channels[cid] = (topic, sid)


def _message(content: memoryview) -> Message:
    cid, _seq, log_time, _pub = struct.unpack_from('<HIQQ', content, 0)
    return cid, log_time, bytes(content[22:])


def _open_chunk(content: memoryview, offset: int, result: ScanResult) -> _Chunk:
    """Read a chunk's records in order until one does not parse; schemas and channels go
    straight into `result`, messages wait for the chunk's message index."""
    start, end, size, crc, compression, pos = _chunk_header(content)
    (length,) = struct.unpack_from('<Q', content, pos - 8)
    chunk = _Chunk(offset, 9 + len(content), None)
    try:
        chunk.data = _decompress(compression, content[pos:pos + length], size)
    except BagError:
        raise
    except Exception as err:  # noqa: BLE001 - zstd's errors: the chunk is unreadable
        chunk.problem = f'cannot decompress ({type(err).__name__}: {err})'
        return chunk
    if crc and zlib.crc32(chunk.data) != crc:
        chunk.problem = 'CRC mismatch'      # still parsed: damaged messages fail to decode
    for op, record, at, record_end in _inner_records(chunk.data):
        if op == OP_MESSAGE:
            message = _message(record)
            if not start <= message[1] <= end:   # a log time outside the chunk's range
                break
            chunk.found[at] = message
        else:
            try:
                _definition(op, record, result)
            except (ValueError, struct.error):
                break
        chunk.readable_to, chunk.covered = record_end, record_end
    if chunk.readable_to < len(chunk.data):
        chunk.problem = chunk.problem or (
            f'records unreadable from byte {chunk.readable_to} of {len(chunk.data)}')
    return chunk


def _indexed_message(data: bytes, at: int, log_time: int) -> tuple[Message, int] | None:
    """The message record a message index points at, if it is intact there."""
    for op, content, _at, end in _inner_records(data, at):
        if op != OP_MESSAGE:
            return None
        message = _message(content)
        return (message, end - at) if message[1] == log_time else None
    return None


def _finish_chunk(chunk: _Chunk, result: ScanResult) -> None:
    """Count a damaged chunk's losses (its message index says what it held) and keep what is
    readable, including messages after the damage that the index points at."""
    result.chunks += 1
    if chunk.problem:
        result.damaged_chunks += 1
        result.problems.append(f'chunk at byte {chunk.offset}: {chunk.problem}')
        result.uncounted |= not chunk.indexed
        if chunk.data is None:
            result.skipped_bytes += chunk.size
        else:
            for at, log_time in sorted(chunk.indexed.items()):
                if at in chunk.found or at < chunk.readable_to:
                    continue
                hit = _indexed_message(chunk.data, at, log_time)
                if hit is not None:
                    chunk.found[at] = hit[0]
                    chunk.covered += hit[1]
            result.skipped_bytes += max(0, len(chunk.data) - chunk.covered)
        result.indexed_lost += len(set(chunk.indexed) - set(chunk.found))
    result.messages.extend(chunk.found[at] for at in sorted(chunk.found))


def _statistics(content: memoryview, result: ScanResult) -> None:
    total, _schemas, _channels, _att, _meta, chunks = struct.unpack_from('<QHIIII', content, 0)
    (size,) = struct.unpack_from('<I', content, 42)
    counts = dict(struct.unpack_from('<HQ', content, 46 + 10 * k) for k in range(size // 10))
    if sum(counts.values()) == total:
        result.expected, result.expected_chunks = counts, chunks


def _cut_chunk(buf: memoryview, pos: int, result: ScanResult) -> None:
    """A cut inside an uncompressed chunk still leaves its leading records readable."""
    if len(buf) - pos < 9 + 40 or buf[pos] != OP_CHUNK:
        return
    tail = buf[pos + 9:]
    try:
        compression, at = _string(tail, 28)
    except (ValueError, struct.error):
        return
    if compression != '':
        return
    data = bytes(tail[at + 8:])
    for op, record, _at, end in _inner_records(data):
        if op == OP_MESSAGE:
            result.messages.append(_message(record))
        else:
            try:
                _definition(op, record, result)
            except (ValueError, struct.error):
                return
        result.stopped_at = pos + 9 + at + 8 + end


def _keep_decodable(result: ScanResult) -> None:
    """Drop messages whose channel is unknown or whose bytes do not decode as their type:
    damaged bytes inside a message leave its framing intact."""
    store = bags.typestore()
    kept = []
    for cid, log_time, data in result.messages:
        channel = result.channels.get(cid)
        msgtype = result.schemas.get(channel[1]) if channel else None
        if msgtype is None:
            result.dropped[f'channel {cid}'] += 1
            continue
        if msgtype in store.fielddefs:
            try:
                bags.deserialize(data, msgtype)
            except BagError:
                result.dropped[channel[0]] += 1
                continue
        kept.append((cid, log_time, data))
    result.messages = kept
    if result.dropped:
        result.problems.append(f'{sum(result.dropped.values())} complete but undecodable '
                               'message(s)')


def scan_mcap(path: Path) -> ScanResult:
    """Every readable schema, channel and message record of `path`, and what was not read."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise BagError(f'{path} is not an MCAP file (bad magic bytes)')
    buf = memoryview(data)
    result = ScanResult(stopped_at=len(MAGIC))
    chunk: _Chunk | None = None
    orphan_index = 0            # entries of message indexes whose chunk was unreadable
    pos = len(MAGIC)
    while pos < len(buf) and not result.complete:
        record = _record_at(buf, pos)
        if record is None:
            resume = _resync(buf, data, pos + 1)
            if resume is None:           # nothing readable after: the file is cut off here
                _cut_chunk(buf, pos, result)
                break
            result.problems.append(f'{resume - pos} unreadable bytes at byte {pos}')
            result.skipped_bytes += resume - pos
            result.uncounted = True          # (a message index after them may count some)
            pos = resume
            continue
        op, content, end = record
        if chunk is not None and op != OP_MESSAGE_INDEX:
            _finish_chunk(chunk, result)
            chunk = None
        if op == OP_CHUNK:
            chunk = _open_chunk(content, pos, result)
        elif op == OP_MESSAGE_INDEX:
            (size,) = struct.unpack_from('<I', content, 2)
            entries = [struct.unpack_from('<QQ', content, 6 + 16 * k) for k in range(size // 16)]
            if chunk is None:
                orphan_index += len(entries)
            else:
                chunk.indexed.update((at, log_time) for log_time, at in entries)
        elif op == OP_FOOTER:
            result.complete = True
        elif op == OP_STATISTICS:
            try:
                _statistics(content, result)
            except struct.error:
                result.problems.append(f'damaged statistics record at byte {pos}')
        elif op == OP_MESSAGE:                      # an unchunked file
            result.messages.append(_message(content))
        else:
            try:
                _definition(op, content, result)
            except (ValueError, struct.error):
                result.problems.append(f'damaged record at byte {pos}')
        pos = end
        result.stopped_at = end
    if chunk is not None:
        _finish_chunk(chunk, result)
    result.indexed_lost += orphan_index
    if result.expected_chunks is not None:
        result.damaged_chunks += max(0, result.expected_chunks - result.chunks)
    _keep_decodable(result)
    if not result.complete:
        result.uncounted = True
        result.tail_bytes = len(buf) - result.stopped_at
        result.reason = f'file ends at byte {len(buf)} without an MCAP footer'
    return result


def _intact(path: Path) -> bool:
    try:
        summary(path)
    except BagError:
        return False
    return True


def _custom_data(path: Path) -> dict[str, str]:
    """The iflybot.* custom data of a damaged bag's metadata.yaml, where it still parses."""
    import yaml

    try:
        meta = yaml.safe_load((path / 'metadata.yaml').read_text())
        custom = meta['rosbag2_bagfile_information'].get('custom_data') or {}
    except Exception:  # noqa: BLE001 - absent or damaged: nothing to carry over
        return {}
    prefix = bags.CUSTOM_DATA_PREFIX
    return {k[len(prefix):]: str(v) for k, v in custom.items() if k.startswith(prefix)}


def _losses(scans: list[ScanResult]) -> tuple[int | None, int, dict[str, int]]:
    """(messages the files held if known, messages lost, lost per topic where known)."""
    lost_topics: Counter[str] = Counter()
    for scan in scans:
        lost_topics.update(scan.dropped)
    if all(s.expected is not None for s in scans):
        expected = 0
        lost_topics = Counter()
        for scan in scans:
            got = Counter(cid for cid, _, _ in scan.messages)
            expected += sum(scan.expected.values())
            for cid, n in scan.expected.items():
                topic = scan.channels.get(cid, (f'channel {cid}', 0))[0]
                if n > got[cid]:
                    lost_topics[topic] += n - got[cid]
        return expected, sum(lost_topics.values()), dict(lost_topics)
    lost = sum(s.indexed_lost for s in scans) + sum(lost_topics.values())
    return None, lost, dict(lost_topics)


def repair_bag(path: Path | str, keep_original: bool = False) -> RepairReport:
    """Rebuild `path` (a bag directory) from its readable messages; no-op on an intact bag.

    The damaged directory is moved aside to `<path>.damaged` while the new bag is written, and
    removed afterwards unless `keep_original`.
    """
    path = Path(path)
    if not path.is_dir():
        raise BagError(f'bag {path} does not exist or is not a directory')
    mcaps = sorted(path.glob('*.mcap'))
    if not mcaps:
        raise BagError(f'bag {path} has no .mcap file: nothing to recover')
    scans = [scan_mcap(m) for m in mcaps]
    if (path / 'metadata.yaml').is_file() and _intact(path) and all(s.clean for s in scans):
        info = summary(path)
        return RepairReport(path, False, info.message_count,
                            {t: c for t, (_, c) in info.topics.items()}, 0, 'bag is intact')
    custom = _custom_data(path)
    expected, lost, lost_topics = _losses(scans)
    lost_bytes = sum(s.skipped_bytes + s.tail_bytes for s in scans)
    reasons = [*(p for s in scans for p in s.problems), *(s.reason for s in scans if s.reason)]
    reason = '; '.join(reasons[:3]) + (f' (and {len(reasons) - 3} more)' if len(reasons) > 3
                                       else '')
    reason = reason or 'metadata.yaml missing'
    aside = path.with_name(path.name + '.damaged')
    if aside.exists():
        raise BagError(f'{aside} exists (an earlier repair?); move it away first')
    path.rename(aside)
    topics: dict[str, int] = {}
    try:
        writer = BagWriter(path)
        messages = []
        for scan in scans:
            for cid, log_time, data in scan.messages:
                topic, sid = scan.channels[cid]
                messages.append((log_time, topic, scan.schemas[sid], data))
        messages.sort(key=lambda m: m[0])
        for log_time, topic, msgtype, data in messages:
            writer.write(topic, msgtype, log_time, data)
            topics[topic] = topics.get(topic, 0) + 1
        writer.set_custom_data({**custom, 'repaired': 'true', 'repair_reason': reason,
                                'repair_lost_messages': str(lost) if expected is not None
                                else f'at least {lost}',
                                'repair_lost_bytes': str(lost_bytes)})
        writer.close()
    except Exception:
        shutil.rmtree(path, ignore_errors=True)
        aside.rename(path)
        raise
    if not keep_original:
        shutil.rmtree(aside)
    return RepairReport(path, True, sum(topics.values()), topics, lost_bytes, reason,
                        messages_expected=expected, messages_lost=lost, lost_topics=lost_topics,
                        damaged_chunks=sum(s.damaged_chunks for s in scans),
                        cut_off=not all(s.complete for s in scans),
                        uncounted=expected is None and any(s.uncounted for s in scans))
