"""Bags cut off by a crash are recovered; broken bags give clear errors through the CLI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from iflybot_vla_policy.data import bags
from iflybot_vla_policy.data.bag_repair import repair_bag
from recording_fixtures import write_synthetic_bag

T0 = 1_700_000_000_000_000_000


def _crashed_bag(path, n: int = 60, compression: str = 'none'):
    """A bag whose writer died mid-recording: chunks on disk, no footer, no metadata.yaml."""
    writer = bags.BagWriter(path, compression=compression)
    for i in range(n):
        img = np.full(40_000, i, np.uint8)   # ~40 kB: a 1 MiB chunk every ~25 messages
        writer.write_message('/cam', 'sensor_msgs/msg/Image', T0 + i * 10**7, bags.make_message(
            'sensor_msgs/msg/Image', header=bags.make_message(
                'std_msgs/msg/Header', stamp=bags.make_message(
                    'builtin_interfaces/msg/Time', sec=i, nanosec=0), frame_id=''),
            height=1, width=40_000 // 3, encoding='rgb8', is_bigendian=0, step=40_000, data=img))
    writer.abort()
    return path


def _iflybot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'iflybot_vla_policy.cli', *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('compression', ['none', 'zstd'])
def test_repair_recovers_the_messages_written_before_the_crash(tmp_path, compression):
    bag = _crashed_bag(tmp_path / 'ep', compression=compression)
    with pytest.raises(bags.BagError, match='bag-repair'):
        bags.summary(bag)
    report = repair_bag(bag)
    assert report.repaired and 'footer' in report.reason
    msgs = list(bags.read_messages(bag))
    # Every flushed chunk survives; only the unflushed tail (< 1 MiB) is lost.
    assert 25 <= len(msgs) == report.message_count < 60
    stamps = [m.decode().header.stamp.sec for m in msgs]
    assert stamps == list(range(len(msgs)))
    assert bags.summary(bag).custom_data['iflybot.repaired'] == 'true'
    assert not (tmp_path / 'ep.damaged').exists()


def test_repair_recovers_a_chunk_cut_in_the_middle(tmp_path):
    bag = _crashed_bag(tmp_path / 'ep')
    mcap = next(bag.glob('*.mcap'))
    full = len(list(_scan_count(mcap)))
    mcap.write_bytes(mcap.read_bytes()[:-50_000])
    report = repair_bag(bag)
    assert 0 < report.message_count < full and report.lost_bytes > 0


def _scan_count(mcap):
    from iflybot_vla_policy.data.bag_repair import scan_mcap
    return scan_mcap(mcap).messages


def test_repair_leaves_an_intact_bag_alone(tmp_path):
    bag = write_synthetic_bag(tmp_path / 'ok')
    before = bags.summary(bag).message_count
    report = repair_bag(bag)
    assert not report.repaired and report.message_count == before


def test_cli_repair_reports_what_it_recovered(tmp_path):
    bag = _crashed_bag(tmp_path / 'ep')
    result = _iflybot('bag-repair', str(bag))
    assert result.returncode == 0, result.stderr
    assert 'recovered' in result.stdout


def test_cli_reports_a_corrupted_bag_without_a_traceback(tmp_path):
    bag = write_synthetic_bag(tmp_path / 'ep0')
    mcap = next(bag.glob('*.mcap'))
    data = bytearray(mcap.read_bytes())
    data[:8] = b'garbage!'
    mcap.write_bytes(bytes(data))
    result = _iflybot('bag2dataset', str(bag), '--out', str(tmp_path / 'ds'), '--no-progress')
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr
    assert 'error:' in result.stderr and 'ep0' in result.stderr
    result = _iflybot('bag-repair', str(tmp_path / 'missing'))
    assert result.returncode == 1 and 'Traceback' not in result.stderr
