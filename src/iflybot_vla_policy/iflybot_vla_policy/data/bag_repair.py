"""Recover a rosbag2 MCAP bag that a crash cut off (no MCAP footer, no metadata.yaml).

An MCAP file is a sequence of length-prefixed records, so everything before the cut is readable
without the summary section: this module scans the records (inside chunks too, zstd or not),
keeps every complete message, and writes a fresh, finalised bag in place of the broken one.
"""
from __future__ import annotations

import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from iflybot_vla_policy.data.bags import BagError, BagWriter, summary

MAGIC = b'\x89MCAP0\r\n'
OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK = 0x02, 0x03, 0x04, 0x05, 0x06


@dataclass
class ScanResult:
    """What a record scan of one .mcap file found."""

    schemas: dict[int, str] = field(default_factory=dict)        # schema id -> type name
    channels: dict[int, tuple[str, int]] = field(default_factory=dict)  # id -> (topic, schema)
    messages: list[tuple[int, int, bytes]] = field(default_factory=list)  # (channel, ns, data)
    complete: bool = False      # reached the footer
    stopped_at: int = 0         # byte offset where the readable part ends
    reason: str = ''            # why the scan stopped early ('' when complete)


@dataclass(frozen=True)
class RepairReport:
    path: Path
    repaired: bool              # False when the bag was already intact
    message_count: int
    topics: dict[str, int]      # topic -> recovered message count
    lost_bytes: int             # bytes after the last readable record
    reason: str


def _string(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from('<I', buf, pos)
    return bytes(buf[pos + 4:pos + 4 + n]).decode(), pos + 4 + n


def _records(buf: memoryview, start: int) -> Iterator[tuple[int, memoryview, int]]:
    """(opcode, content, end offset) of each complete record from `start`; stops at a cut."""
    pos = start
    while pos + 9 <= len(buf):
        op, length = struct.unpack_from('<BQ', buf, pos)
        end = pos + 9 + length
        if end > len(buf):
            return
        yield op, buf[pos + 9:end], end
        pos = end


def _decompress(compression: str, data: memoryview, size: int) -> bytes:
    if compression == '':
        return bytes(data)
    if compression == 'zstd':
        import zstandard
        return zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=size)
    raise BagError(f'unsupported MCAP chunk compression {compression!r}')


def _handle(op: int, content: memoryview, result: ScanResult) -> None:
    if op == OP_SCHEMA:
        (sid,) = struct.unpack_from('<H', content, 0)
        name, _ = _string(content, 2)
        result.schemas[sid] = name
    elif op == OP_CHANNEL:
        cid, sid = struct.unpack_from('<HH', content, 0)
        topic, _ = _string(content, 4)
        result.channels[cid] = (topic, sid)
    elif op == OP_MESSAGE:
        cid, _seq, log_time, _pub = struct.unpack_from('<HIQQ', content, 0)
        result.messages.append((cid, log_time, bytes(content[22:])))


def scan_mcap(path: Path) -> ScanResult:
    """Every complete schema, channel and message record of `path`, in file order."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise BagError(f'{path} is not an MCAP file (bad magic bytes)')
    buf = memoryview(data)
    result = ScanResult(stopped_at=len(MAGIC))
    for op, content, end in _records(buf, len(MAGIC)):
        if op == OP_CHUNK:
            _start, _end, size, _crc = struct.unpack_from('<QQQI', content, 0)
            compression, pos = _string(content, 28)
            (rec_len,) = struct.unpack_from('<Q', content, pos)
            try:
                inner = _decompress(compression, content[pos + 8:pos + 8 + rec_len], size)
            except Exception as err:  # a damaged chunk ends the readable part
                result.reason = f'damaged chunk at byte {end - len(content) - 9}: {err}'
                return result
            for iop, icontent, _ in _records(memoryview(inner), 0):
                _handle(iop, icontent, result)
        elif op == OP_FOOTER:
            result.complete = True
        else:
            _handle(op, content, result)
        result.stopped_at = end
    if not result.complete:
        # A cut inside an uncompressed chunk still leaves its leading records readable.
        tail = buf[result.stopped_at:]
        if len(tail) > 9 + 28 and tail[0] == OP_CHUNK:
            compression, pos = _string(tail[9:], 28)
            if compression == '':
                chunk_start = result.stopped_at
                for iop, icontent, iend in _records(tail[9:], pos + 8):
                    _handle(iop, icontent, result)
                    result.stopped_at = chunk_start + 9 + iend
        result.reason = result.reason or f'file ends at byte {len(buf)} without an MCAP footer'
    return result


def _intact(path: Path) -> bool:
    try:
        summary(path)
    except BagError:
        return False
    return True


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
    if (path / 'metadata.yaml').is_file() and _intact(path):
        info = summary(path)
        scan = scan_mcap(mcaps[0])
        if scan.complete:
            return RepairReport(path, False, info.message_count,
                                {t: c for t, (_, c) in info.topics.items()}, 0, 'bag is intact')
    scans = [scan_mcap(m) for m in mcaps]
    lost = sum(m.stat().st_size - s.stopped_at for m, s in zip(mcaps, scans, strict=True)
               if not s.complete)
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
        reasons = '; '.join(s.reason for s in scans if s.reason) or 'metadata.yaml missing'
        writer.set_custom_data({'repaired': 'true', 'repair_reason': reasons})
        writer.close()
    except Exception:
        shutil.rmtree(path, ignore_errors=True)
        aside.rename(path)
        raise
    if not keep_original:
        shutil.rmtree(aside)
    return RepairReport(path, True, sum(topics.values()), topics, lost, reasons)
