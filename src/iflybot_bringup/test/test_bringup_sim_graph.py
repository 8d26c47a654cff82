"""`iflybot up` with the project's own nodes: MuJoCo sim, policy, expert teleop and recorder.

These run the shipped graphs end to end over DDS. They skip, naming what is missing, only while a
node of another issue (its module or its parameter file) has not landed.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from bringup_testing import wait_for

from iflybot_bringup import graph as graph_mod

pytestmark = [pytest.mark.ros, pytest.mark.slow]

NODE_MODULES = {'iflybot_sim': 'iflybot_vla_policy.ros.sim_node',
                'iflybot_policy': 'iflybot_vla_policy.ros.policy_node',
                'iflybot_recorder': 'iflybot_vla_policy.ros.recorder_node',
                'iflybot_expert_teleop': 'iflybot_vla_policy.ros.expert_teleop_node'}


def _require(graph: str, overrides: dict[str, str]) -> None:
    """Skip while a node of the graph has not landed (module or parameter file missing)."""
    resolved = graph_mod.resolve(graph_mod.load_graph(graph), overrides)
    missing = []
    for node in resolved.nodes:
        module = NODE_MODULES.get(node.name)
        if module and importlib.util.find_spec(module) is None:
            missing.append(f'module {module}')
        missing += [f'parameter file {p.name}' for p in node.params_files if not p.is_file()]
    if missing:
        pytest.skip(f'graph {graph}: not landed yet: {", ".join(missing)}')


def _bags(output_dir: Path) -> list[Path]:
    return sorted(p.parent for p in output_dir.rglob('metadata.yaml'))


def _topic_counts(bag: Path) -> dict[str, int]:
    """Messages per topic of a rosbag2 bag, read back from its files (rosbags' reader)."""
    from rosbags.rosbag2 import Reader

    counts: dict[str, int] = {}
    with Reader(bag) as reader:
        for connection, _stamp, _raw in reader.messages():
            counts[connection.topic] = counts.get(connection.topic, 0) + 1
    return counts


def _up(tmp_path: Path, *argv: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / 'up.log'
    proc = subprocess.Popen([sys.executable, '-m', 'iflybot_vla_policy.cli', 'up', *argv],
                            stdout=log.open('w'), stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return proc, log


def test_record_graph_runs_expert_episodes_into_readable_bags_and_ends_by_itself(
        tmp_path: Path) -> None:
    _require('record', {})
    out = tmp_path / 'bags'
    proc, log = _up(tmp_path, 'record', 'episodes:=1', f'output_dir:={out}')
    try:
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 0, text
    bags = _bags(out)
    assert len(bags) == 1, text
    counts = _topic_counts(bags[0])
    assert counts.get('/joint_states', 0) > 10, counts
    assert counts.get('/fr3_arm_controller/joint_trajectory', 0) > 0, counts
    assert counts.get('/scene_camera/color/image_raw', 0) > 0, counts


# Under heavy load the policy node once never answered change_state (cause not found yet):
# one rerun, with a shorter lifecycle timeout so that a hang costs 90 s, not 180 s.
@pytest.mark.flaky(reruns=1)
def test_sim_policy_and_recorder_come_up_move_the_arm_and_ctrl_c_leaves_a_readable_bag(
        tmp_path: Path, ros_node: object) -> None:
    overrides = {'record': 'true', 'preset': 'tiny', 'instruction': 'pick up the red block'}
    _require('sim', overrides)
    from iflybot_vla_msgs.srv import StartEpisode
    from trajectory_msgs.msg import JointTrajectory

    node = ros_node
    received: list[JointTrajectory] = []
    node.create_subscription(JointTrajectory, '/fr3_arm_controller/joint_trajectory',
                             received.append, 10)
    out = tmp_path / 'bags'
    proc, log = _up(tmp_path, '--lifecycle-timeout', '90', 'sim',
                    *(f'{k}:={v}' for k, v in overrides.items()), f'output_dir:={out}')
    try:
        # record from before the policy is active (its configure builds the model: slow), so
        # that the bag holds its first trajectories
        start = node.create_client(StartEpisode, '/iflybot_recorder/start_episode')
        assert wait_for(lambda: start.wait_for_service(timeout_sec=0.1)
                        or proc.poll() is not None, timeout=120), log.read_text()
        request = StartEpisode.Request(instruction=overrides['instruction'], task='pick_place',
                                       operator_name='test')
        future = start.call_async(request)
        assert wait_for(future.done, timeout=30) and future.result().success, log.read_text()
        assert wait_for(lambda: '/iflybot_policy is active' in log.read_text()
                        or proc.poll() is not None, timeout=240), log.read_text()
        assert proc.poll() is None, log.read_text()
        assert wait_for(lambda: len(received) >= 1, timeout=120), log.read_text()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 0, text
    bags = _bags(out)
    assert len(bags) == 1, text
    counts = _topic_counts(bags[0])
    assert counts.get('/fr3_arm_controller/joint_trajectory', 0) > 0, counts
    assert counts.get('/joint_states', 0) > 0, counts


def test_a_killed_recorder_ends_the_recording_not_the_motion(
        tmp_path: Path, ros_node: object) -> None:
    """Issue 27 item 6: SIGKILL of the recorder in a running sim graph. The simulator keeps
    publishing joint states, the policy keeps commanding the arm, `iflybot up` stays up and
    names the failure, and exits 1 at Ctrl-C saying the graph ran on without the recorder."""
    overrides = {'record': 'true', 'preset': 'tiny', 'instruction': 'pick up the red block'}
    _require('sim', overrides)
    from iflybot_vla_msgs.msg import PolicyStatus
    from sensor_msgs.msg import JointState
    from trajectory_msgs.msg import JointTrajectory

    node = ros_node
    counts = {'joint_states': 0, 'trajectories': 0, 'running': 0}

    def count(key: str, msg: object) -> None:
        if not isinstance(msg, PolicyStatus) or msg.state == PolicyStatus.STATE_RUNNING:
            counts[key] += 1

    node.create_subscription(JointState, '/joint_states',
                             lambda m: count('joint_states', m), 10)
    node.create_subscription(JointTrajectory, '/fr3_arm_controller/joint_trajectory',
                             lambda m: count('trajectories', m), 10)
    node.create_subscription(PolicyStatus, '/vla/status', lambda m: count('running', m), 10)
    proc, log = _up(tmp_path, '--lifecycle-timeout', '90', 'sim',
                    *(f'{k}:={v}' for k, v in overrides.items()),
                    f'output_dir:={tmp_path / "bags"}')
    try:
        assert wait_for(lambda: counts['trajectories'] >= 1 or proc.poll() is not None,
                        timeout=240), log.read_text()
        line = next(x for x in log.read_text().splitlines()
                    if 'started /iflybot_recorder (pid ' in x)
        os.kill(int(line.rsplit('pid ', 1)[1].rstrip(')')), signal.SIGKILL)
        assert wait_for(lambda: 'optional node iflybot_recorder was killed by SIGKILL'
                        in log.read_text(), timeout=30), log.read_text()
        seen = dict(counts)
        assert wait_for(lambda: all(counts[k] >= seen[k] + 3 for k in counts), timeout=60), \
            (counts, seen, log.read_text())
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert 'required node' not in text, text
    assert 'FAILED: optional node iflybot_recorder was killed by SIGKILL' in text, text
    assert code == 1, text


@pytest.fixture
def ros_node() -> object:
    """An rclpy node spun on a background thread, in its own context."""
    rclpy = pytest.importorskip('rclpy')
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('bringup_sim_graph_test', context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        yield node
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.shutdown(context=context)
        thread.join(timeout=2.0)
