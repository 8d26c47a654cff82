"""Push recorded through ROS (`iflybot record --task push`): the expert re-plans from the puck's
live pose, which the simulator publishes on /sim/object_poses as a perception stack would, and
the recorder keeps those poses in the bag."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from iflybot_vla_policy.data import bags

pytestmark = [pytest.mark.ros, pytest.mark.slow]
pytest.importorskip('rclpy')

OBJECT_POSE_RATE = 25.0      # the simulator's default /sim/object_poses rate (sim Hz)


def test_a_push_episode_is_recorded_with_the_object_poses_it_was_planned_from(tmp_path):
    out = tmp_path / 'rec'
    proc = subprocess.run(
        [sys.executable, '-m', 'iflybot_vla_policy.cli', 'record', '--episodes', '1',
         '--out', str(out), '--task', 'push', '--first-seed', '3',
         '--image-size', '48', '48', '--camera-rate', '5', '--max-episode-s', '6',
         '--isolated'],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    episodes = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    assert len(episodes) == 1 and episodes[0]['recorded'], episodes
    # Whether the expert's push succeeds through ROS depends on timing here (both seeds failed
    # in one CI run, passed in others: an open finding of issue 23); the data path is checked,
    # on 6 s of one episode.
    episode = episodes[0]
    bag = out / episode['episode_id']
    messages = [m.decode() for m in bags.read_messages(bag, {'/sim/object_poses'})]
    stamps = np.array([m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for m in messages])
    assert len(stamps) > 10 and np.all(np.diff(stamps) > 0)
    assert len(stamps) >= 0.98 * (round((stamps[-1] - stamps[0]) * OBJECT_POSE_RATE) + 1)
    first = messages[0]
    assert first.header.frame_id == 'fr3_link0'
    assert {'puck', 'zone_a', 'zone_b'} <= set(first.names)

    p = first.poses[list(first.names).index('puck')].position
    assert np.all(np.isfinite([p.x, p.y, p.z])) and 0.3 < p.x < 0.8
