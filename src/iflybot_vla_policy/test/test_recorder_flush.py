"""The recorder's flush policy: what a recorder killed without finalising leaves in its bag
(issue 27, item 5). Without it rosbags held up to 1 MiB (seconds of an episode) in memory."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from iflybot_vla_policy.data import bags
from iflybot_vla_policy.data.bag_repair import repair_bag
from iflybot_vla_policy.data.episode_recorder import EpisodeRecorder, RecorderConfig

T0 = 1_700_000_000_000_000_000
JOINT_STATE = 'sensor_msgs/msg/JointState'


def _joint_state(k: int) -> bytes:
    msg = bags.make_message(
        JOINT_STATE, header=bags.make_message('std_msgs/msg/Header', stamp=bags.make_message(
            'builtin_interfaces/msg/Time', sec=k, nanosec=0), frame_id=''),
        name=['fr3_joint1'], position=np.array([0.01 * k]), velocity=np.zeros(0),
        effort=np.zeros(0))
    return bytes(bags.typestore().serialize_cdr(msg, JOINT_STATE))


def _what_a_crash_leaves(bag: Path, copy: Path) -> int:
    """Messages a repair recovers from the bag's file as it is on disk now."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bag, copy)
    return repair_bag(copy).message_count


def test_the_opening_episode_info_is_in_the_file_as_soon_as_the_episode_starts(tmp_path):
    recorder = EpisodeRecorder(RecorderConfig(root=tmp_path / 'rec', min_free_disk_gb=0.0))
    _, path = recorder.start(T0, task='pick_place')
    try:
        assert _what_a_crash_leaves(path, tmp_path / 'crash') == 1
        assert bags.read_episode_info(tmp_path / 'crash')['task'] == 'pick_place'
    finally:
        recorder.discard()


def test_recorded_messages_reach_the_file_within_the_flush_period(tmp_path):
    recorder = EpisodeRecorder(RecorderConfig(root=tmp_path / 'rec', min_free_disk_gb=0.0,
                                              flush_period_s=0.05))
    _, path = recorder.start(T0)
    try:
        for k in range(20):                         # ~5 kB: far below rosbags' 1 MiB chunk
            assert recorder.put('/joint_states', JOINT_STATE, T0 + k, _joint_state(k))
        put_at = time.monotonic()
        deadline = put_at + 5.0
        while _what_a_crash_leaves(path, tmp_path / 'crash') < 21 and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        on_disk = time.monotonic() - put_at
        assert _what_a_crash_leaves(path, tmp_path / 'crash') == 21   # + the EpisodeInfo
        assert on_disk < 1.0
    finally:
        recorder.discard()


def test_flushes_make_chunks_a_normal_reader_reads_back_in_order(tmp_path):
    recorder = EpisodeRecorder(RecorderConfig(root=tmp_path / 'rec', min_free_disk_gb=0.0,
                                              flush_period_s=0.0))     # a chunk per message
    _, path = recorder.start(T0)
    for k in range(30):
        recorder.put('/joint_states', JOINT_STATE, T0 + 1 + k, _joint_state(k))
    result = recorder.stop(T0 + 10**9, success=True)
    assert not result.error
    stamps = [m.decode().header.stamp.sec for m in bags.read_messages(path, {'/joint_states'})]
    assert stamps == list(range(30))
    assert repair_bag(path).repaired is False


def test_a_flush_period_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match='flush_period_s'):
        RecorderConfig(root=tmp_path, flush_period_s=-1.0)
