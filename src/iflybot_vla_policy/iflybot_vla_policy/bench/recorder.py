"""Benchmark: the episode recorder with two 640x480 rgb8 cameras at 30 Hz + joint states at 200 Hz.

1. Over DDS (subprocesses; `ros/recorder_bench.py`): `iflybot_recorder` (raw subscriptions,
   bounded queue, writer thread) against the naive baseline (deserialise, re-serialise and write
   the bag inside each callback), same publishers: messages published vs recorded, queue drops
   and the recorder process's CPU (% of one core). The publishers keep a deep reliable history
   so that what goes missing is the recorder's doing, not the middleware evicting samples
   before a retransmission could repair them.
2. Write throughput on the same payload, no DDS: `EpisodeRecorder` (queue + writer thread + the
   rosbags MCAP writer + EpisodeInfo and metadata) versus the raw `mcap` library writer and the
   raw rosbags writer writing the same serialised messages in a loop: MB/s and the ratio.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from iflybot_vla_policy.data import bags
from iflybot_vla_policy.data.episode_recorder import EpisodeRecorder, RecorderConfig

WIDTH, HEIGHT, CAM_HZ, JS_HZ = 640, 480, 30.0, 200.0
CAMERAS = ('/scene_camera/color/image_raw', '/wrist_camera/color/image_raw')


def _payload(seconds: float) -> list[tuple[str, str, int, bytes]]:
    """Serialised messages of `seconds` of the benchmark streams, in time order."""
    store = bags.typestore()
    stamp = bags.make_message('builtin_interfaces/msg/Time', sec=0, nanosec=0)
    header = bags.make_message('std_msgs/msg/Header', stamp=stamp, frame_id='')
    rng = np.random.default_rng(0)
    images = []
    for _ in CAMERAS:
        img = bags.make_message('sensor_msgs/msg/Image', header=header, height=HEIGHT,
                                width=WIDTH, encoding='rgb8', is_bigendian=0, step=WIDTH * 3,
                                data=rng.integers(0, 256, WIDTH * HEIGHT * 3, dtype=np.uint8))
        images.append(bytes(store.serialize_cdr(img, 'sensor_msgs/msg/Image')))
    names = [f'fr3_joint{i}' for i in range(1, 8)] + ['fr3_finger_joint1', 'fr3_finger_joint2']
    js = bags.make_message('sensor_msgs/msg/JointState', header=header, name=names,
                           position=np.zeros(9), velocity=np.zeros(9), effort=np.zeros(9))
    js_bytes = bytes(store.serialize_cdr(js, 'sensor_msgs/msg/JointState'))
    events = [(k / JS_HZ, 'js') for k in range(int(seconds * JS_HZ))]
    events += [(k / CAM_HZ, 'cam') for k in range(int(seconds * CAM_HZ))]
    out = []
    for t, kind in sorted(events):
        ns = int(1e18 + t * 1e9)
        if kind == 'js':
            out.append(('/joint_states', 'sensor_msgs/msg/JointState', ns, js_bytes))
        else:
            out.extend((topic, 'sensor_msgs/msg/Image', ns, data)
                       for topic, data in zip(CAMERAS, images, strict=True))
    return out


def _raw_mcap(path: Path, payload: list[tuple[str, str, int, bytes]]) -> None:
    """The `mcap` library's writer: schema + channel per topic, then the messages."""
    from mcap.writer import CompressionType, Writer

    store = bags.typestore()
    with path.open('wb') as f:
        writer = Writer(f, compression=CompressionType.NONE)   # like the bags (uncompressed)
        writer.start(profile='ros2', library='bench')
        channels: dict[str, int] = {}
        for topic, msgtype, ns, data in payload:
            if topic not in channels:
                msgdef, _ = store.generate_msgdef(msgtype)
                schema = writer.register_schema(name=msgtype, encoding='ros2msg',
                                                data=msgdef.encode())
                channels[topic] = writer.register_channel(topic=topic, message_encoding='cdr',
                                                          schema_id=schema)
            writer.add_message(channel_id=channels[topic], log_time=ns, publish_time=ns,
                               data=data)
        writer.finish()


def _raw_rosbags(path: Path, payload: list[tuple[str, str, int, bytes]]) -> None:
    writer = bags.BagWriter(path)
    for topic, msgtype, ns, data in payload:
        writer.write(topic, msgtype, ns, data)
    writer.close()


def _recorder(path: Path, payload: list[tuple[str, str, int, bytes]]) -> dict[str, Any]:
    size = sum(len(p[3]) for p in payload)
    rec = EpisodeRecorder(RecorderConfig(root=path, min_free_disk_gb=0.0,
                                         queue_size=len(payload) + 1,
                                         queue_max_mb=size / 1e6 + 1))
    rec.start(payload[0][2], task='bench')
    for topic, msgtype, ns, data in payload:
        rec.put(topic, msgtype, ns, data)
    result = rec.stop(payload[-1][2], True)
    return {'dropped': result.dropped_total, 'messages': result.message_count}


def _throughput(seconds: float, repeats: int) -> dict[str, Any]:
    payload = _payload(seconds)
    mb = sum(len(p[3]) for p in payload) / 1e6
    results: dict[str, list[float]] = {'recorder': [], 'raw_mcap': [], 'raw_rosbags': []}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix='bench_recorder_') as tmp:
        names = list(results)
        for r in range(repeats):
            # Interleaved, in a rotating order, so all see the same machine load and none is
            # always the first to hit a cold page cache; the best time of each is kept.
            for name in names[r % 3:] + names[:r % 3]:
                target = Path(tmp) / f'{name}_{r}'
                start = time.perf_counter()
                if name == 'recorder':
                    extra = _recorder(target, payload)
                elif name == 'raw_mcap':
                    _raw_mcap(target.with_suffix('.mcap'), payload)
                else:
                    _raw_rosbags(target, payload)
                results[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in results.items()}
    return {
        'payload_mb': round(mb, 1), 'payload_messages': len(payload),
        'recorder_mb_s': round(mb / best['recorder'], 1),
        'raw_mcap_mb_s': round(mb / best['raw_mcap'], 1),
        'raw_rosbags_mb_s': round(mb / best['raw_rosbags'], 1),
        'ratio_recorder_vs_raw_mcap': round(best['raw_mcap'] / best['recorder'], 3),
        'ratio_recorder_vs_raw_rosbags': round(best['raw_rosbags'] / best['recorder'], 3),
        'recorder_dropped': extra.get('dropped'),
        'required_mb_s': round((2 * WIDTH * HEIGHT * 3 * CAM_HZ) / 1e6, 1),
    }


def _dds(kind: str, seconds: float) -> dict[str, Any]:
    env = dict(os.environ)
    # A domain of its own (in the Linux-safe 215-232 range that tests do not use): another
    # graph on the same domain would answer the recorder's services and add traffic.
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env['ROS_DOMAIN_ID'] = str(215 + os.getpid() % 17)
    proc = subprocess.run(
        [sys.executable, '-m', 'iflybot_vla_policy.ros.recorder_bench', 'measure', '--kind',
         kind, '--duration', str(seconds), '--width', str(WIDTH), '--height', str(HEIGHT),
         '--cam-hz', str(CAM_HZ), '--js-hz', str(JS_HZ)],
        capture_output=True, text=True, timeout=seconds + 300, env=env)
    if proc.returncode != 0:
        return {'error': proc.stderr.strip().splitlines()[-1] if proc.stderr else 'failed'}
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    reply = data.pop('stop_reply', '')
    if reply:   # the recorder's own account: queue drops and middleware-reported losses
        dropped = re.search(r'dropped (\d+)', reply)
        lost = re.search(r'lost in transport (\d+)', reply)
        data['recorder_queue_dropped'] = int(dropped.group(1)) if dropped else None
        data['recorder_reported_lost'] = int(lost.group(1)) if lost else 0
    data['recorder_cpu_percent_of_one_core'] = round(data['recorder_cpu_percent_of_one_core'], 1)
    data['bag_mb'] = round(data['bag_mb'], 1)
    return data


def run(quick: bool = False) -> dict[str, Any]:
    seconds = 2.0 if quick else 10.0
    dds = {kind: _dds(kind, seconds) for kind in ('recorder', 'naive')}
    return {
        'streams': f'2x {WIDTH}x{HEIGHT} rgb8 @ {CAM_HZ:g} Hz + joint_states @ {JS_HZ:g} Hz',
        'dds_seconds': seconds,
        'dds_iflybot_recorder': dds['recorder'],
        'dds_naive_baseline': dds['naive'],
        'write_throughput': _throughput(1.0 if quick else 3.0, 3 if quick else 6),
    }


if __name__ == '__main__':
    print(json.dumps(run(quick='--quick' in sys.argv), indent=2))
