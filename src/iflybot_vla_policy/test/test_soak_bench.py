"""The soak benchmark's bookkeeping (`iflybot bench --only soak`): what it reads from the graph
log and /proc, and how it cuts a run into time windows. The run itself is minutes of the sim
graph: the quick bench skips it, and docs/faults.md holds its figures."""
from __future__ import annotations

import math
import os

import pytest

pytest.importorskip('rclpy')

from iflybot_vla_policy.ros.soak_bench import (  # noqa: E402
    GoalRecord,
    StatusRecord,
    node_endings,
    node_pids,
    rss_table,
    run,
    tree_rss_mb,
    windows,
)

LOG = """[up              ] graph 'sim': 2 nodes (iflybot_sim, iflybot_policy)
[up              ] started /iflybot_sim (pid 4100)
[up              ] started /iflybot_policy (pid 4101)
[iflybot_policy  ] [INFO] exited the hold: fresh inputs
[up              ] iflybot_recorder was killed by SIGKILL
[up              ] optional node iflybot_recorder was killed by SIGKILL after 3.0 s: ...
[up              ] optional node rviz2 exited after 9.0 s; the rest of the graph runs on
[up              ] iflybot_sim exited (code 1)
"""


def test_node_pids_and_endings_come_from_the_runner_lines_only() -> None:
    assert node_pids(LOG) == {'iflybot_sim': 4100, 'iflybot_policy': 4101}
    endings = node_endings(LOG)
    assert len(endings) == 2 and 'SIGKILL' in endings[0] and 'code 1' in endings[1]


def test_resident_memory_counts_the_process_tree_and_a_gone_process_is_nan() -> None:
    assert tree_rss_mb(os.getpid()) > 10.0
    assert math.isnan(tree_rss_mb(2**22 + 7))
    table = rss_table({'a': 100.0}, {'a': 104.0})
    assert table == {'a': {'start_mb': 100.0, 'end_mb': 104.0, 'growth_pct': 4.0}}


def test_windows_split_goals_chunks_and_status_and_count_missed_ticks_per_window() -> None:
    goals = [GoalRecord(t, 'pick_place', 1, t < 50, 5.0, '', 2.0) for t in (10, 40, 70, 130)]
    chunks = [(t, 40.0 if t < 60 else 80.0) for t in range(0, 120, 2)]
    statuses = [StatusRecord(t, 1, 50.0, 2.0 + t / 60, t // 10, 60.0, 90.0 + t)
                for t in range(0, 120)]
    out = windows(120.0, goals, chunks, statuses, count=2)
    first, second = out['0-60s'], out['60-120s']
    assert (first['goals'], first['succeeded']) == (2, 2)
    assert second['goals'] == 2      # the goal ending after the duration counts in the last
    assert first['inference_ms_p50'] == 40.0 and second['inference_ms_p50'] == 80.0
    assert first['missed_ticks'] == 5 and second['missed_ticks'] == 5
    assert first['e2e_ms_p99_max'] == 149.0 and second['e2e_ms_p99_max'] == 209.0
    assert first['load_avg_1min_mean'] == 2.0


def test_the_quick_bench_skips_the_soak_unless_given_a_duration() -> None:
    assert 'skipped' in run(quick=True)
