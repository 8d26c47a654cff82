"""EpisodeRecorder without ROS: bounded queue drops are counted, zstd bags, index, refusals."""
from __future__ import annotations

import numpy as np
import pytest

from iflybot_vla_policy.data import bags
from iflybot_vla_policy.data.episode_recorder import (
    EpisodeRecorder,
    RecorderConfig,
    RecorderError,
    read_index,
)

T0 = 1_700_000_000_000_000_000


def _image_bytes(value: int, size: int = 100_000) -> bytes:
    msg = bags.make_message(
        'sensor_msgs/msg/Image', header=bags.make_message(
            'std_msgs/msg/Header', stamp=bags.make_message(
                'builtin_interfaces/msg/Time', sec=value, nanosec=0), frame_id=''),
        height=1, width=size // 3, encoding='rgb8', is_bigendian=0, step=size,
        data=np.full(size, value % 256, np.uint8))
    return bytes(bags.typestore().serialize_cdr(msg, 'sensor_msgs/msg/Image'))


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path):
    rec = EpisodeRecorder(RecorderConfig(root=tmp_path, min_free_disk_gb=0.0, queue_size=4,
                                         queue_max_mb=0.3))
    rec.start(T0)
    accepted = sum(rec.put('/cam', 'sensor_msgs/msg/Image', T0 + i, _image_bytes(i))
                   for i in range(200))
    result = rec.stop(T0 + 10**9, success=True)
    assert result.dropped_total == 200 - accepted > 0
    assert result.message_count == accepted + 2            # + opening/closing EpisodeInfo
    assert f'dropped {200 - accepted}' in result.summary()
    assert bags.summary(result.path).topics['/cam'][1] == accepted
    assert read_index(tmp_path)[0]['dropped'] == 200 - accepted


def test_zstd_bags_are_smaller_and_read_back(tmp_path):
    sizes = {}
    for compression in ('none', 'zstd'):
        rec = EpisodeRecorder(RecorderConfig(root=tmp_path / compression, min_free_disk_gb=0.0,
                                             compression=compression))
        rec.start(T0)
        for i in range(20):
            rec.put('/cam', 'sensor_msgs/msg/Image', T0 + i, _image_bytes(i))
        result = rec.stop(T0 + 10**9, success=False, notes='compressed')
        sizes[compression] = sum(p.stat().st_size for p in result.path.glob('*.mcap'))
        stamps = [m.decode().header.stamp.sec for m in bags.read_messages(result.path, {'/cam'})]
        assert stamps == list(range(20))
    assert sizes['zstd'] < sizes['none'] / 5


def test_stop_and_discard_without_an_episode_are_refused(tmp_path):
    rec = EpisodeRecorder(RecorderConfig(root=tmp_path, min_free_disk_gb=0.0))
    with pytest.raises(RecorderError, match='not recording'):
        rec.stop(T0, True)
    with pytest.raises(RecorderError, match='nothing to discard'):
        rec.discard()
    assert not rec.put('/cam', 'sensor_msgs/msg/Image', T0, b'')


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ValueError, match='compression'):
        RecorderConfig(root=tmp_path, compression='lz4')


def test_record_refuses_held_out_evaluation_seeds(tmp_path):
    import subprocess
    import sys

    def record(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, '-m', 'iflybot_vla_policy.cli', 'record',
                               '--out', str(tmp_path / 'rec'), *args],
                              capture_output=True, text=True, timeout=120)

    held_out = record('--first-seed', '1000000', '--episodes', '2')
    assert held_out.returncode == 2 and 'held-out' in held_out.stderr
    assert 'Traceback' not in held_out.stderr
    assert not (tmp_path / 'rec').exists()
