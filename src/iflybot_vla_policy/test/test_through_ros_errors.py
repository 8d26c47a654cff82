"""`iflybot eval --through-ros` and `iflybot demo` name a dead graph in one line (issue 27).

The graph is a stand-in process with the sim's, recorder's and policy's interfaces: its first
goal succeeds, during the second it exits (the policy server disappears). The real DemoDriver
notices; the command prints one error line naming the cause, keeps the episode it finished and
exits 1, where it printed a RuntimeError traceback before.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('rclpy')

from iflybot_vla_policy import cli  # noqa: E402
from iflybot_vla_policy.eval import through_ros  # noqa: E402

pytestmark = pytest.mark.ros

FAKE_GRAPH = """
import os, threading, time, rclpy
from rclpy.action import ActionServer, GoalResponse
from rclpy.executors import MultiThreadedExecutor
from iflybot_vla_msgs.action import RunPolicy
from iflybot_vla_msgs.msg import PolicyStatus
from iflybot_vla_msgs.srv import ResetSim, StartEpisode, StopEpisode
rclpy.init()
node = rclpy.create_node('iflybot_fake_graph')
pub = node.create_publisher(PolicyStatus, '/vla/status', 10)
node.create_timer(0.2, lambda: pub.publish(PolicyStatus(state=PolicyStatus.STATE_RUNNING)))
def reset(request, response):
    response.success, response.instruction = True, 'pick up the red block'
    return response
def start(request, response):
    response.success, response.path = True, '/tmp/episode'
    return response
def stop(request, response):
    response.success, response.message = True, 'stopped'
    return response
node.create_service(ResetSim, '/iflybot_sim/reset', reset)
node.create_service(StartEpisode, '/iflybot_recorder/start_episode', start)
node.create_service(StopEpisode, '/iflybot_recorder/stop_episode', stop)
goals = []
def execute(handle):
    goals.append(handle)
    if len(goals) > 1:
        os._exit(1)          # the policy node dies mid-goal
    time.sleep(0.2)
    handle.succeed()
    return RunPolicy.Result(success=True, duration=0.2, reason='task success')
ActionServer(node, RunPolicy, '/iflybot_policy/run_policy', execute_callback=execute,
             goal_callback=lambda goal: GoalResponse.ACCEPT)
executor = MultiThreadedExecutor(4)
executor.add_node(node)
executor.spin()
"""


@pytest.fixture
def dying_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """`iflybot up` replaced by the stand-in graph, for eval and demo alike."""
    def start_graph(_graph: str, _overrides: object, log_path: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, '-c', FAKE_GRAPH], stdout=log_path.open('w'),
                                stderr=subprocess.STDOUT, start_new_session=True)

    monkeypatch.setattr(through_ros, 'start_graph', start_graph)


def _one_error_line(err: str) -> str:
    assert 'Traceback' not in err, err
    lines = [line for line in err.splitlines() if 'error' in line.lower()]
    assert len(lines) == 1, err
    return lines[0]


def test_eval_through_ros_names_a_dead_policy_and_keeps_the_finished_episodes(
        dying_graph: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(['eval', '--through-ros', '--preset', 'tiny', '--tasks', 'pick_place',
                   '--episodes', '3', '--max-time', '2', '--image-size', '64',
                   '--out', str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    line = _one_error_line(err)
    assert line.startswith('iflybot eval: error: ')
    assert ('/iflybot_policy/run_policy disappeared' in line or 'no /vla/status' in line), line
    assert 'stopped after 1 of 3 episodes' in line and 'graph.log' in line
    report = json.loads((tmp_path / 'report.json').read_text())
    assert len(report['episodes']) == 1 and report['episodes'][0]['success']
    assert report['meta']['stopped_early'].startswith('after 1 of 3 episodes: ')


def test_demo_names_a_dead_policy_in_one_line_and_exits_nonzero(
        dying_graph: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = Path(__file__).resolve().parents[3] / 'checkpoints' / 'tiny_pick_place'
    if not checkpoint.is_dir():
        pytest.skip('no bundled checkpoint')
    rc = cli.main(['demo', '--checkpoint', str(checkpoint), '--tasks', 'pick_place,stack,drawer',
                   '--max-episode-s', '2', '--out', str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 1, out + err
    line = _one_error_line(err)
    assert line.startswith('iflybot demo: error: ')
    assert ('/iflybot_policy/run_policy disappeared' in line or 'no /vla/status' in line), line
    assert 'stopped after 1 of 3 episodes' in line and 'graph.log' in line
    assert 'episode 1/3 pick_place' in out and 'SUCCESS' in out
    assert 'iflybot demo: 1/1 episodes successful' in out
