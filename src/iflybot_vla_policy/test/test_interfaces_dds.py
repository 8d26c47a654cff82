"""Our interfaces work across OS processes over DDS: a topic (ActionChunk) and a service."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.ros

PEER = textwrap.dedent("""
    import sys
    import rclpy
    from iflybot_vla_msgs.msg import ActionChunk
    from iflybot_vla_msgs.srv import StartEpisode

    rclpy.init()
    node = rclpy.create_node('peer')
    echo = node.create_publisher(ActionChunk, 'chunk_echo', 10)

    def on_chunk(msg):
        msg.model_id = 'echo:' + msg.model_id
        echo.publish(msg)

    def on_start(request, response):
        response.success = True
        response.episode_id = request.task + '_0001'
        response.message = 'recording ' + request.instruction
        response.path = '/bags/' + request.operator_name
        return response

    node.create_subscription(ActionChunk, 'chunk', on_chunk, 10)
    node.create_service(StartEpisode, 'start_episode', on_start)
    print('ready', flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
""")


@pytest.fixture
def peer_process():
    proc = subprocess.Popen([sys.executable, '-c', PEER], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == 'ready', proc.stderr.read() if proc.stderr else ''
    yield proc
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:   # a slow DDS teardown must not fail the test
        proc.kill()
        proc.wait(timeout=10)


def test_action_chunk_and_start_episode_cross_processes(peer_process, ros_context, wait) -> None:
    import rclpy
    from iflybot_vla_msgs.msg import ActionChunk
    from iflybot_vla_msgs.srv import StartEpisode
    from rclpy.executors import SingleThreadedExecutor

    node = rclpy.create_node('tester', context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    spin = lambda: executor.spin_once(timeout_sec=0.05)  # noqa: E731
    received: list[ActionChunk] = []
    node.create_subscription(ActionChunk, 'chunk_echo', received.append, 10)
    pub = node.create_publisher(ActionChunk, 'chunk', 10)
    assert wait(lambda: pub.get_subscription_count() > 0, timeout=20, spin=spin)

    msg = ActionChunk()
    msg.joint_names = [f'fr3_joint{i}' for i in range(1, 8)]
    msg.horizon, msg.action_dim, msg.dt = 2, 7, 0.1
    msg.positions = [float(i) for i in range(14)]
    msg.gripper = [0.08, 0.0]
    msg.model_id = 'tiny'
    msg.inference_latency_ms = 12.5
    assert wait(lambda: bool(received) or pub.publish(msg) or False, timeout=20, spin=spin)
    echoed = received[0]
    assert echoed.model_id == 'echo:tiny'
    assert list(echoed.positions) == [float(i) for i in range(14)]
    assert list(echoed.joint_names) == msg.joint_names
    assert echoed.horizon == 2 and echoed.dt == pytest.approx(0.1)

    client = node.create_client(StartEpisode, 'start_episode')
    assert client.wait_for_service(timeout_sec=20)
    future = client.call_async(StartEpisode.Request(
        instruction='put the red cube in the bowl', task='pick_place', operator_name='alice'))
    executor.spin_until_future_complete(future, timeout_sec=20)
    response = future.result()
    assert response is not None
    assert response.success
    assert response.episode_id == 'pick_place_0001'
    assert response.message == 'recording put the red cube in the bowl'
    assert response.path == '/bags/alice'
    node.destroy_node()
