"""The DDS half of the recorder benchmark (`bench/recorder.py` runs it in a subprocess).

Roles (`python -m iflybot_vla_policy.ros.recorder_bench ROLE ...`):
- `publish`: two 640x480 rgb8 cameras at 30 Hz and /joint_states at 200 Hz for a duration,
  started once a subscriber matched; prints what it sent as JSON;
- `naive`: the baseline recorder: deserialising subscriptions, `serialize_message` and a
  synchronous bag write inside each callback; records from start until SIGINT;
- `measure`: runs one recorder kind ('recorder' = iflybot_recorder, 'naive') against the
  publisher, samples the recorder process's CPU time, prints the result as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import rclpy
from iflybot_vla_msgs.srv import StartEpisode, StopEpisode
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState

CAMERAS = ('/scene_camera/color/image_raw', '/wrist_camera/color/image_raw')
TOPICS = [f'{t}:sensor_msgs/msg/Image' for t in CAMERAS] + [
    '/joint_states:sensor_msgs/msg/JointState']
NAMES = [f'fr3_joint{i}' for i in range(1, 8)] + ['fr3_finger_joint1', 'fr3_finger_joint2']


def _qos() -> QoSProfile:
    # Deep enough that a consumer stalling ~1 s does not lose messages in the middleware.
    return QoSProfile(depth=2000, reliability=ReliabilityPolicy.RELIABLE)


def publish(duration: float, width: int, height: int, cam_hz: float, js_hz: float,
            streams: str = 'all') -> None:
    """Publish the cameras, the joint states or both (`streams`) from this process."""
    rclpy.init()
    node = rclpy.create_node(f'recorder_bench_publisher_{streams}')
    cams = [node.create_publisher(Image, t, _qos()) for t in CAMERAS] \
        if streams in ('all', 'cameras') else []
    js_pub = node.create_publisher(JointState, '/joint_states', _qos()) \
        if streams in ('all', 'joints') else None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
            p.get_subscription_count() > 0 for p in (*cams, *([js_pub] if js_pub else []))):
        time.sleep(0.05)
    time.sleep(0.5)
    images = []
    for level in (60, 180):
        img = Image(height=height, width=width, encoding='rgb8', step=width * 3)
        img.data = bytes([level]) * (width * height * 3)
        images.append(img)
    js = JointState(name=NAMES, position=[0.0] * 9, velocity=[0.0] * 9, effort=[0.0] * 9)
    sent = {**({'/joint_states': 0} if js_pub else {}),
            **(dict.fromkeys(CAMERAS, 0) if cams else {})}
    start = time.monotonic()
    next_js = start if js_pub is not None else float('inf')
    next_cam = start if cams else float('inf')
    while True:
        now = time.monotonic()
        if now - start >= duration:
            break
        if now >= next_js:
            js.header.stamp = node.get_clock().now().to_msg()
            js.position[0] = now - start
            js_pub.publish(js)
            sent['/joint_states'] += 1
            next_js += 1.0 / js_hz
        if now >= next_cam:
            stamp = node.get_clock().now().to_msg()
            for pub, img, topic in zip(cams, images, CAMERAS, strict=True):
                img.header.stamp = stamp
                pub.publish(img)
                sent[topic] += 1
            next_cam += 1.0 / cam_hz
        time.sleep(min(0.01, max(0.0, min(next_js, next_cam) - time.monotonic())))
    elapsed = time.monotonic() - start
    time.sleep(1.0)        # let reliable retransmissions finish before the writers go away
    print(json.dumps({'sent': sent, 'elapsed_s': elapsed}), flush=True)
    node.destroy_node()
    rclpy.shutdown()


def naive(out: str) -> None:
    """Baseline: deserialise, re-serialise and write synchronously in each callback."""
    from rclpy.serialization import serialize_message

    from iflybot_vla_policy.data.bags import BagWriter

    rclpy.init()
    node = rclpy.create_node('naive_recorder')
    writer = BagWriter(Path(out))
    lock = threading.Lock()

    def callback(topic: str, msgtype: str):
        def on_message(msg: Any) -> None:
            data = serialize_message(msg)
            with lock:
                writer.write(topic, msgtype, node.get_clock().now().nanoseconds, data)
        return on_message

    for spec in TOPICS:
        topic, msgtype = spec.split(':')
        cls = Image if msgtype.endswith('Image') else JointState
        node.create_subscription(cls, topic, callback(topic, msgtype), 100)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if rclpy.ok():
            raise
    finally:
        writer.close()
        node.destroy_node()
        rclpy.try_shutdown()


def _cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def measure(kind: str, duration: float, width: int, height: int, cam_hz: float,
            js_hz: float) -> dict[str, Any]:
    from iflybot_vla_policy.data.bags import summary

    tmp = Path(tempfile.mkdtemp(prefix='recorder_bench_'))
    env = os.environ.copy()
    if kind == 'recorder':
        argv = [sys.executable, '-m', 'iflybot_vla_policy.ros.recorder_node', '--ros-args',
                '-p', f'output_dir:={tmp}', '-p', 'min_free_disk_gb:=0.0',
                '-p', 'qos_depth:=200', '-p', f'topics:={json.dumps(TOPICS)}']
    elif kind == 'naive':
        argv = [sys.executable, '-m', 'iflybot_vla_policy.ros.recorder_bench', 'naive',
                '--out', str(tmp / 'naive')]
    else:
        raise ValueError(f"kind must be 'recorder' or 'naive', got {kind!r}")
    rec = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env)
    rclpy.init()
    node = rclpy.create_node('recorder_bench_client')
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()

    def call(srv: Any, name: str, request: Any) -> Any:
        client = node.create_client(srv, name)
        if not client.wait_for_service(timeout_sec=60):
            raise RuntimeError(f'{name} not available')
        time.sleep(1.0)
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(120):
            raise RuntimeError(f'{name} did not answer')
        return future.result()

    result: dict[str, Any] = {}
    try:
        if kind == 'recorder':
            reply = call(StartEpisode, '/iflybot_recorder/start_episode',
                         StartEpisode.Request(task='bench'))
            if not reply.success:
                raise RuntimeError(reply.message)
        # Cameras and joint states come from separate processes, as camera drivers and
        # franka_ros2 do (one Fast DDS participant sending 2x900 kB images at 30 Hz starves
        # its own 200 Hz joint-state writer; that is a publisher-side effect, not recording).
        pubs = [subprocess.Popen(
            [sys.executable, '-m', 'iflybot_vla_policy.ros.recorder_bench', 'publish',
             '--duration', str(duration), '--width', str(width), '--height', str(height),
             '--cam-hz', str(cam_hz), '--js-hz', str(js_hz), '--streams', streams],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for streams in ('cameras', 'joints')]
        cpu0, wall0 = _cpu_seconds(rec.pid), time.monotonic()
        published = {'sent': {}, 'elapsed_s': 0.0}
        for pub in pubs:
            out, err = pub.communicate(timeout=duration + 120)
            if pub.returncode != 0:
                raise RuntimeError(f'publisher failed: {err[-2000:]}')
            part = json.loads(out.strip().splitlines()[-1])
            published['sent'].update(part['sent'])
            published['elapsed_s'] = max(published['elapsed_s'], part['elapsed_s'])
        cpu1, wall1 = _cpu_seconds(rec.pid), time.monotonic()
        if kind == 'recorder':
            stop = call(StopEpisode, '/iflybot_recorder/stop_episode',
                        StopEpisode.Request(success=True))
            if not stop.success:
                rec.kill()
                raise RuntimeError(f'stop_episode failed: {stop.message}; recorder output: '
                                   f'{rec.communicate()[0][-2000:]}')
            bag = Path(stop.path)
            result['stop_reply'] = stop.message
            rec.send_signal(signal.SIGINT)
        else:
            rec.send_signal(signal.SIGINT)
            bag = tmp / 'naive'
        rec.wait(timeout=120)
        info = summary(bag)
        recorded = {t: c for t, (_, c) in info.topics.items() if t in published['sent']}
        sent = published['sent']
        total_bytes = sum(p.stat().st_size for p in bag.glob('*.mcap'))
        result.update({
            'published': sum(sent.values()),
            'recorded': sum(recorded.values()),
            'missing': sum(sent.values()) - sum(recorded.values()),
            'missing_by_topic': {t: sent[t] - recorded.get(t, 0) for t in sent},
            'recorder_cpu_percent_of_one_core': 100.0 * (cpu1 - cpu0) / (wall1 - wall0),
            'publish_s': published['elapsed_s'],
            'bag_mb': total_bytes / 1e6,
        })
    finally:
        if rec.poll() is None:
            rec.kill()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='recorder_bench')
    parser.add_argument('role', choices=('publish', 'naive', 'measure'))
    parser.add_argument('--kind', default='recorder')
    parser.add_argument('--out', default='')
    parser.add_argument('--duration', type=float, default=5.0)
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--cam-hz', type=float, default=30.0)
    parser.add_argument('--js-hz', type=float, default=200.0)
    parser.add_argument('--streams', choices=('all', 'cameras', 'joints'), default='all')
    args = parser.parse_args(argv)
    if args.role == 'publish':
        publish(args.duration, args.width, args.height, args.cam_hz, args.js_hz, args.streams)
    elif args.role == 'naive':
        naive(args.out)
    else:
        print(json.dumps(measure(args.kind, args.duration, args.width, args.height,
                                 args.cam_hz, args.js_hz)), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
