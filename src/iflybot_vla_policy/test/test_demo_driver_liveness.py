"""The demo / eval driver notices within seconds that the policy died mid-goal (issue 27, item 7).

Before, it waited max_duration * 4 + 60 s for a result that could not come.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

rclpy = pytest.importorskip('rclpy')

from iflybot_vla_msgs.action import RunPolicy  # noqa: E402
from rclpy.action import ActionServer, GoalResponse  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402

from iflybot_vla_policy.ros.demo_driver import DemoDriver  # noqa: E402

pytestmark = pytest.mark.ros

# A stand-in for the policy node: the same action and status topic, a goal that never ends.
FAKE_POLICY = """
import threading, rclpy
from rclpy.action import ActionServer, GoalResponse
from rclpy.executors import MultiThreadedExecutor
from iflybot_vla_msgs.action import RunPolicy
from iflybot_vla_msgs.msg import PolicyStatus
rclpy.init()
node = rclpy.create_node('iflybot_policy')
pub = node.create_publisher(PolicyStatus, '/vla/status', 10)
node.create_timer(0.2, lambda: pub.publish(PolicyStatus(state=PolicyStatus.STATE_RUNNING)))
ActionServer(node, RunPolicy, '~/run_policy', execute_callback=lambda h: threading.Event().wait(),
             goal_callback=lambda goal: GoalResponse.ACCEPT)
print('ready', flush=True)
executor = MultiThreadedExecutor(4)
executor.add_node(node)
executor.spin()
"""


def _run_in_thread(driver: DemoDriver) -> tuple[threading.Thread, dict]:
    """driver.run_policy with max_duration 1 s in a thread: its outcome and how long it took."""
    outcome: dict = {}

    def target() -> None:
        tic = time.monotonic()
        try:
            outcome['result'] = driver.run_policy('pick', 1.0)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome['error'] = exc
        outcome['elapsed'] = time.monotonic() - tic

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


@pytest.fixture
def driver(ros_context):
    node = DemoDriver(frame_every=10**9, context=ros_context, policy_silence_s=3.0)
    executor = MultiThreadedExecutor(num_threads=2, context=ros_context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        yield node, executor
    finally:
        executor.shutdown(timeout_sec=5)
        thread.join(timeout=5)
        node.destroy_node()


def test_a_sigkilled_policy_is_reported_within_seconds_not_after_the_result_timeout(
        driver, wait) -> None:
    node, _ = driver
    proc = subprocess.Popen([sys.executable, '-c', FAKE_POLICY], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == 'ready'
        thread, outcome = _run_in_thread(node)
        # the goal is accepted and the policy's status heard before the kill
        assert wait(lambda: node._latest_status is not None, timeout=30)
        time.sleep(0.5)
        assert 'error' not in outcome and 'result' not in outcome
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        thread.join(timeout=20)
        assert not thread.is_alive(), 'still waiting 20 s after the policy was SIGKILLed'
        assert isinstance(outcome.get('error'), RuntimeError), outcome
        assert 'no /vla/status from the policy' in str(outcome['error'])
        assert time.monotonic() - killed < 10
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_policy_action_server_that_leaves_the_graph_is_reported_at_once(
        driver, ros_context) -> None:
    node, _ = driver
    policy = rclpy.create_node('iflybot_policy', context=ros_context)
    accepted, release = threading.Event(), threading.Event()

    def goal_callback(goal) -> GoalResponse:
        accepted.set()
        return GoalResponse.ACCEPT

    def execute(handle) -> RunPolicy.Result:
        release.wait()
        return RunPolicy.Result()

    server = ActionServer(policy, RunPolicy, '~/run_policy', execute_callback=execute,
                          goal_callback=goal_callback)
    executor = MultiThreadedExecutor(num_threads=2, context=ros_context)
    executor.add_node(policy)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        thread, outcome = _run_in_thread(node)
        assert accepted.wait(timeout=30)
        time.sleep(0.3)
        server.destroy()
        gone = time.monotonic()
        thread.join(timeout=20)
        assert not thread.is_alive()
        assert isinstance(outcome.get('error'), RuntimeError), outcome
        assert 'run_policy disappeared' in str(outcome['error'])
        assert time.monotonic() - gone < 5
    finally:
        release.set()
        executor.shutdown(timeout_sec=5)
        spinner.join(timeout=5)
        policy.destroy_node()
