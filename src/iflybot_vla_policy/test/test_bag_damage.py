"""Bags with damaged bytes inside (issue 27, item 5): bag-repair counts what it could not keep,
bag2dataset names the bag and the way out instead of a bare OverflowError."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from iflybot_vla_policy import cli
from iflybot_vla_policy.data import bags
from iflybot_vla_policy.data.bag_repair import OP_CHUNK, repair_bag
from recording_fixtures import write_synthetic_bag


def _copy(src: Path, dst: Path, compression: str = 'none') -> Path:
    """The same messages rewritten (zstd chunks when asked)."""
    writer = bags.BagWriter(dst, compression=compression)
    for m in bags.read_messages(src):
        writer.write(m.topic, m.msgtype, m.timestamp_ns, m.data)
    writer.close()
    return dst


def _chunks(mcap: Path) -> list[tuple[int, int]]:
    """(offset, record length) of each chunk record of an intact file."""
    data, pos, out = mcap.read_bytes(), 8, []
    while pos + 9 <= len(data):
        op, length = struct.unpack_from('<BQ', data, pos)
        if op == OP_CHUNK:
            out.append((pos, 9 + length))
        if op == 0x0F:             # data end: the summary follows
            break
        pos += 9 + length
    return out


def _damage(bag: Path, at: int, size: int, keep_metadata: bool = False) -> Path:
    """Overwrite `size` bytes of the bag's .mcap from `at` with random ones."""
    mcap = next(bag.glob('*.mcap'))
    data = bytearray(mcap.read_bytes())
    data[at:at + size] = np.random.default_rng(at).integers(0, 256, size, np.uint8).tobytes()
    mcap.write_bytes(bytes(data))
    if not keep_metadata:
        (bag / 'metadata.yaml').unlink()
    return bag


def _originals(bag: Path) -> set[tuple[str, int, bytes]]:
    return {(m.topic, m.timestamp_ns, m.data) for m in bags.read_messages(bag)}


@pytest.fixture(scope='module')
def episode(tmp_path_factory) -> Path:
    """A 2.2 s synthetic episode (578 messages, two MCAP chunks), never modified."""
    return write_synthetic_bag(tmp_path_factory.mktemp('bags') / 'ep0')


def test_repair_counts_the_messages_lost_to_random_bytes_inside_a_chunk(episode, tmp_path):
    bag = shutil.copytree(episode, tmp_path / 'ep')
    total = bags.summary(bag).message_count
    originals = _originals(bag)
    first, _ = _chunks(next(bag.glob('*.mcap')))[0]
    report = repair_bag(_damage(bag, first + 400_000, 200_000))
    assert report.repaired and report.messages_expected == total
    assert 0 < report.messages_lost and report.message_count + report.messages_lost == total
    assert sum(report.lost_topics.values()) == report.messages_lost
    assert report.lost_topics['/joint_states'] > 0
    assert 190_000 <= report.lost_bytes <= 210_000 and report.damaged_chunks == 1
    recovered = [(m.topic, m.timestamp_ns, m.data) for m in bags.read_messages(bag)]
    assert len(recovered) == report.message_count
    # No CRC in rosbags' chunks: the one message the damage starts in can still decode.
    assert sum(r not in originals for r in recovered) <= 1
    # The chunk's message index finds the messages after the damaged bytes, too.
    last_lost = max(t for _, t, _ in originals - set(recovered))
    assert any(m[1] > last_lost and m[0] == '/joint_states' for m in recovered)
    custom = bags.summary(bag).custom_data
    assert custom['iflybot.repair_lost_messages'] == str(report.messages_lost)


def test_repair_of_a_damaged_bag_with_its_metadata_is_not_called_intact(episode, tmp_path):
    bag = shutil.copytree(episode, tmp_path / 'ep')
    total = bags.summary(bag).message_count
    first, _ = _chunks(next(bag.glob('*.mcap')))[0]
    report = repair_bag(_damage(bag, first + 400_000, 200_000, keep_metadata=True))
    assert report.repaired and report.messages_lost > 0
    assert bags.summary(bag).message_count == report.message_count == total - report.messages_lost


def test_repair_counts_a_zstd_chunk_whose_compressed_bytes_are_damaged(episode, tmp_path):
    bag = _copy(episode, tmp_path / 'ep', compression='zstd')
    total = bags.summary(bag).message_count
    chunks = _chunks(next(bag.glob('*.mcap')))
    at, length = chunks[-1]
    report = repair_bag(_damage(bag, at + length // 2, 64))
    assert report.damaged_chunks == 1 and report.messages_expected == total
    assert report.messages_lost > 0 and report.message_count + report.messages_lost == total
    assert 'cannot decompress' in report.reason


def test_repair_steps_over_a_destroyed_chunk_header_to_the_next_chunk(episode, tmp_path):
    bag = shutil.copytree(episode, tmp_path / 'ep')
    total = bags.summary(bag).message_count
    chunks = _chunks(next(bag.glob('*.mcap')))
    report = repair_bag(_damage(bag, chunks[0][0], 64))     # the first chunk's header
    assert report.messages_expected == total and report.damaged_chunks == 1
    # the second chunk and everything after it is still read
    assert 0 < report.message_count and report.message_count + report.messages_lost == total
    assert 'unreadable bytes at byte' in report.reason


def test_repair_drops_and_counts_a_message_whose_bytes_do_not_decode(tmp_path):
    bag = tmp_path / 'ep'
    writer = bags.BagWriter(bag)
    good = bags.make_message('std_msgs/msg/String', data='pick')
    for i in range(5):
        writer.write_message('/vla/instruction', 'std_msgs/msg/String', 10 + i, good)
    # framing intact, content not a JointState (as damaged bytes inside a message leave it)
    writer.write('/joint_states', 'sensor_msgs/msg/JointState', 20,
                 b'\x00\x01\x00\x00' + b'\xff' * 40)
    writer.close()
    report = repair_bag(bag)
    assert report.repaired
    assert (report.message_count, report.messages_lost) == (5, 1)
    assert report.lost_topics == {'/joint_states': 1}
    assert 'undecodable' in report.reason


def test_cli_bag_repair_says_how_many_messages_and_bytes_it_lost(episode, tmp_path, capsys):
    bag = shutil.copytree(episode, tmp_path / 'ep')
    total = bags.summary(bag).message_count
    first, _ = _chunks(next(bag.glob('*.mcap')))[0]
    _damage(bag, first + 400_000, 200_000)
    assert cli.main(['bag-repair', str(bag)]) == 0
    out = capsys.readouterr().out
    assert f'of {total} messages' in out and ' lost ' in out
    assert ' lost 0 messages' not in out and ' 0 unreadable bytes' not in out
    assert '1 damaged chunk(s)' in out


def test_cli_bag_repair_says_a_cut_off_tail_is_uncounted(tmp_path, capsys):
    bag = tmp_path / 'ep'
    writer = bags.BagWriter(bag)
    for i in range(40):
        writer.write('/cam', 'std_msgs/msg/String', 10 + i, bytes(
            bags.typestore().serialize_cdr(bags.make_message(
                'std_msgs/msg/String', data='x' * 40_000), 'std_msgs/msg/String')))
    writer.abort()
    assert cli.main(['bag-repair', str(bag)]) == 0
    out = capsys.readouterr().out
    assert 'lost an unknown number of messages after the cut' in out
    assert 'without an MCAP footer' in out


def test_bag2dataset_names_a_damaged_bag_and_the_way_out(episode, tmp_path, capsys):
    bag = shutil.copytree(episode, tmp_path / 'ep_damaged')
    first, _ = _chunks(next(bag.glob('*.mcap')))[0]
    _damage(bag, first + 400_000, 200_000, keep_metadata=True)
    assert cli.main(['bag2dataset', str(bag), '--out', str(tmp_path / 'ds'),
                     '--no-progress']) == 1
    err = capsys.readouterr().err
    assert 'iflybot bag2dataset: error:' in err and str(bag) in err
    assert f'iflybot bag-repair {bag}' in err
    assert cli.main(['bag2dataset', str(episode), str(bag), '--out', str(tmp_path / 'ds2'),
                     '--no-progress', '--skip-bad']) == 0
    captured = capsys.readouterr()
    assert f'skipped {bag}:' in captured.err and 'wrote 1 episode(s)' in captured.out


def test_bag2dataset_names_the_bag_of_a_message_that_does_not_decode(episode, tmp_path,
                                                                      capsys):
    bag = tmp_path / 'ep'
    writer = bags.BagWriter(bag)
    for m in bags.read_messages(episode):
        data = m.data
        if m.topic == '/joint_states' and not writer.message_count % 50:
            data = data[:4] + b'\xff' * (len(data) - 4)
        writer.write(m.topic, m.msgtype, m.timestamp_ns, data)
    writer.close()
    assert cli.main(['bag2dataset', str(bag), '--out', str(tmp_path / 'ds'),
                     '--no-progress']) == 1
    err = capsys.readouterr().err
    assert f'bag {bag}: a /joint_states message logged at' in err
    assert 'does not decode' in err and 'bag-repair' in err
