"""The Foxglove live view: a client speaking the Foxglove WebSocket protocol receives each channel.

A real bridge node and real publishers over DDS; the client is `websockets` speaking the Foxglove
WebSocket protocol (advertise -> subscribe -> binary message frames) under the subprotocol name
foxglove-sdk's server accepts, `foxglove.sdk.v1` (the protocol of `foxglove.websocket.v1` under a
new name; the server refuses the old name with HTTP 400). It decodes the well-known schemas'
protobuf with the FileDescriptorSet the server advertises, as Foxglove does.
"""
from __future__ import annotations

import base64
import json
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from bringup_testing import wait_for  # noqa: F401 (sets the test ROS environment)

rclpy = pytest.importorskip('rclpy')
pytest.importorskip('foxglove')

from builtin_interfaces.msg import Time  # noqa: E402
from geometry_msgs.msg import Point  # noqa: E402
from iflybot_vla_msgs.msg import PolicyStatus  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Header, String  # noqa: E402
from test_bringup_launch import (  # noqa: E402
    fake_launch,  # noqa: F401 (a fixture)
    launched_nodes,
    load_launch_file,
)
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from iflybot_bringup import graph as graph_mod  # noqa: E402
from iflybot_bringup.foxglove_bridge import FoxgloveBridge  # noqa: E402

SUBPROTOCOL = 'foxglove.sdk.v1'
SCENE, WRIST = '/scene_camera/color/image_raw', '/wrist_camera/color/image_raw'
TOPICS = {SCENE: 'foxglove.RawImage', WRIST: 'foxglove.RawImage',
          '/joint_states': 'foxglove.JointStates', '/vla/markers': 'foxglove.SceneUpdate',
          '/vla/status': None, '/vla/instruction': None}


# ----------------------------------------------------------------------------------- protobuf

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, raw value) of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise AssertionError(f'unexpected wire type {wire}')
        yield number, wire, value


def descriptors(file_descriptor_set: bytes) -> dict[str, dict[int, tuple[str, int, str, bool]]]:
    """Message full name -> {field number: (name, type, type name, repeated)}.

    FileDescriptorSet.file = 1; FileDescriptorProto: package = 2, message_type = 4;
    DescriptorProto: name = 1, field = 2, nested_type = 3; FieldDescriptorProto: name = 1,
    number = 3, label = 4 (3 repeated), type = 5, type_name = 6.
    """
    out: dict[str, dict[int, tuple[str, int, str, bool]]] = {}

    def message(buf: bytes, prefix: str) -> None:
        fields: dict[int, tuple[str, int, str, bool]] = {}
        name, nested = '', []
        for number, _, value in _fields(buf):
            if number == 1:
                name = value.decode()
            elif number == 2:
                f = {n: v for n, _, v in _fields(value)}
                fields[f[3]] = (f[1].decode(), f[5], f.get(6, b'').decode(), f.get(4) == 3)
            elif number == 3:
                nested.append(value)
        out[f'{prefix}.{name}'] = fields
        for child in nested:
            message(child, f'{prefix}.{name}')

    for number, _, file in _fields(file_descriptor_set):
        assert number == 1
        parts = {n: v for n, _, v in _fields(file) if n == 2}
        package = parts.get(2, b'').decode()
        for n, _, value in _fields(file):
            if n == 4:
                message(value, f'.{package}' if package else '')
    return out


# FieldDescriptorProto.type -> struct format of the fixed-width types
_FIXED = {1: '<d', 2: '<f', 6: '<Q', 7: '<I', 15: '<i', 16: '<q'}


def decode(buf: bytes, type_name: str, types: dict[str, Any]) -> dict[str, Any]:
    """A protobuf message as a dict by field name (messages nested, repeated as lists)."""
    out: dict[str, Any] = {}
    for number, wire, raw in _fields(buf):
        if number not in types[type_name]:
            continue
        name, kind, sub, repeated = types[type_name][number]
        if kind == 11:
            value: Any = decode(raw, sub, types)
        elif kind == 9:
            value = raw.decode()
        elif kind == 12:
            value = bytes(raw)
        elif kind in _FIXED and wire in (1, 5):
            value = struct.unpack(_FIXED[kind], raw)[0]
        else:
            value = raw
        if repeated:
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------------- fixtures

def _image(width: int, height: int, fill: int) -> Image:
    data = bytes((fill + i) % 256 for i in range(width * height * 3))
    return Image(header=Header(stamp=Time(sec=12, nanosec=345), frame_id='camera'),
                 width=width, height=height, encoding='rgb8', step=width * 3, data=data)


def _path() -> MarkerArray:
    header = Header(stamp=Time(sec=3), frame_id='fr3_link0')
    line = Marker(header=header, ns='vla_plan', id=0, type=Marker.LINE_STRIP, action=Marker.ADD,
                  points=[Point(x=0.3, y=0.0, z=0.5), Point(x=0.4, y=0.1, z=0.4)])
    line.scale.x = 0.005
    line.color.g = line.color.a = 1.0
    end = Marker(header=header, ns='vla_plan', id=1, type=Marker.SPHERE, action=Marker.DELETE)
    return MarkerArray(markers=[line, end])


@pytest.fixture
def bridge() -> Iterator[FoxgloveBridge]:
    """The bridge on a free port with a publisher of every input topic, spun in a thread."""
    context = rclpy.Context()
    rclpy.init(context=context)
    node = FoxgloveBridge(context=context, parameter_overrides=[
        Parameter('host', value='127.0.0.1'), Parameter('port', value=0),
        Parameter('max_image_rate_hz', value=0.0)])
    publisher = rclpy.create_node('fake_graph', context=context)
    pubs = {SCENE: publisher.create_publisher(Image, SCENE, qos_profile_sensor_data),
            WRIST: publisher.create_publisher(Image, WRIST, 10),
            '/joint_states': publisher.create_publisher(JointState, '/joint_states', 10),
            '/vla/markers': publisher.create_publisher(MarkerArray, '/vla/markers', 10),
            '/vla/status': publisher.create_publisher(PolicyStatus, '/vla/status', 10),
            '/vla/instruction': publisher.create_publisher(String, '/vla/instruction', 10)}
    messages = {
        SCENE: _image(4, 3, 0), WRIST: _image(2, 2, 100),
        '/joint_states': JointState(header=Header(stamp=Time(sec=5)),
                                    name=['fr3_joint1', 'fr3_joint2'], position=[0.5, -0.25],
                                    velocity=[0.125, 0.0]),
        '/vla/markers': _path(),
        '/vla/status': PolicyStatus(state=PolicyStatus.STATE_HOLD, instruction='stack the cubes',
                                    chunks_produced=7, inference_latency_p50_ms=41.5,
                                    inference_latency_p99_ms=80.25, last_error='stale images'),
        '/vla/instruction': String(data='stack the cubes')}
    stop = threading.Event()

    def publish() -> None:
        while not stop.is_set():
            for topic, pub in pubs.items():
                if topic != '/vla/instruction':    # once: the bridge must repeat it
                    pub.publish(messages[topic])
            stop.wait(0.1)

    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    executor.add_node(publisher)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    node.publish_instruction_once = lambda: pubs['/vla/instruction'].publish(  # type: ignore
        messages['/vla/instruction'])
    feeder = threading.Thread(target=publish, daemon=True)
    feeder.start()
    try:
        yield node
    finally:
        stop.set()
        feeder.join()
        executor.shutdown()
        node.destroy_node()
        publisher.destroy_node()
        rclpy.shutdown(context=context)
        spinner.join(timeout=5)


# ----------------------------------------------------------------------------------- tests

def test_a_foxglove_client_receives_every_channel(bridge: FoxgloveBridge) -> None:
    with connect(f'ws://127.0.0.1:{bridge.port}', subprotocols=[SUBPROTOCOL],
                 max_size=None) as ws:
        assert ws.subprotocol == SUBPROTOCOL
        channels: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 10.0
        while set(channels) != set(TOPICS) and time.monotonic() < deadline:
            frame = json.loads(ws.recv(timeout=5.0))
            if frame['op'] == 'advertise':
                channels.update({c['topic']: c for c in frame['channels']})
        assert set(channels) == set(TOPICS)
        for topic, schema in TOPICS.items():
            if schema is None:
                assert channels[topic]['encoding'] == 'json', topic
            else:
                assert (channels[topic]['encoding'], channels[topic]['schemaName']) == (
                    'protobuf', schema), topic
        by_sub = {i: topic for i, topic in enumerate(TOPICS, start=1)}
        ws.send(json.dumps({'op': 'subscribe', 'subscriptions': [
            {'id': i, 'channelId': channels[topic]['id']} for i, topic in by_sub.items()]}))
        bridge.publish_instruction_once()   # type: ignore[attr-defined]

        got: dict[str, Any] = {}
        deadline = time.monotonic() + 10.0
        while set(got) != set(TOPICS) and time.monotonic() < deadline:
            frame = ws.recv(timeout=5.0)
            if isinstance(frame, str):
                continue
            opcode, sub_id, _log_time = struct.unpack_from('<BIQ', frame)
            assert opcode == 1                   # message data
            topic, payload = by_sub[sub_id], frame[13:]
            channel = channels[topic]
            if channel['encoding'] == 'json':
                got[topic] = json.loads(payload)
            else:
                types = descriptors(base64.b64decode(channel['schema']))
                got[topic] = decode(payload, f'.{channel["schemaName"]}', types)
    assert set(got) == set(TOPICS), f'no message on {sorted(set(TOPICS) - set(got))}'

    scene = got[SCENE]
    assert (scene['width'], scene['height'], scene['encoding'], scene['step']) == (
        4, 3, 'rgb8', 12)
    assert scene['data'] == bytes(_image(4, 3, 0).data)
    assert scene['timestamp'] == {'seconds': 12, 'nanos': 345}
    assert got[WRIST]['data'] == bytes(_image(2, 2, 100).data)
    joints = got['/joint_states']['joints']
    assert [(j['name'], j['position']) for j in joints] == [('fr3_joint1', 0.5),
                                                            ('fr3_joint2', -0.25)]
    assert joints[0]['velocity'] == 0.125
    update = got['/vla/markers']
    [line] = update['entities']
    assert (line['id'], line['frame_id']) == ('vla_plan/0', 'fr3_link0')
    points = line['lines'][0]['points']
    xyz = [tuple(p.get(k, 0.0) for k in 'xyz') for p in points]   # proto3 omits zeros
    assert xyz == [(0.3, 0.0, 0.5), (0.4, 0.1, 0.4)]
    assert [d['id'] for d in update['deletions']] == ['vla_plan/1']
    status = got['/vla/status']
    assert (status['state_name'], status['state'], status['instruction']) == (
        'HOLD', PolicyStatus.STATE_HOLD, 'stack the cubes')
    assert (status['inference_latency_p50_ms'], status['inference_latency_p99_ms']) == (
        41.5, 80.25)
    assert status['last_error'] == 'stale images'
    assert got['/vla/instruction'] == {'data': 'stack the cubes'}


def test_graphs_start_the_bridge_only_with_the_foxglove_argument() -> None:
    for name in ('sim', 'record', 'franka', 'gazebo'):
        graph = graph_mod.load_graph(name)
        assert 'iflybot_foxglove' not in [n.name for n in graph_mod.resolve(graph).nodes], name
        resolved = graph_mod.resolve(graph, {'foxglove': 'true', 'foxglove_port': '9001'})
        [node] = [n for n in resolved.nodes if n.name == 'iflybot_foxglove']
        assert (node.spec.package, node.spec.executable) == ('iflybot_bringup',
                                                             'foxglove_bridge')
        assert node.params['port'] == 9001 and not node.spec.required, name
        assert [f.name for f in node.params_files] == ['foxglove.yaml']


def test_sim_launch_file_starts_the_bridge_as_the_runner_does(
        fake_launch: dict[str, type]) -> None:  # noqa: F811 (the imported fixture)
    overrides = {'foxglove': 'true', 'foxglove_port': '9001'}
    resolved = graph_mod.resolve(graph_mod.load_graph('sim'), overrides)
    launched = launched_nodes(load_launch_file('sim'), dict(resolved.values))
    got = launched['/iflybot_foxglove']
    assert (got['package'], got['executable']) == ('iflybot_bringup', 'foxglove_bridge')
    assert got['params']['port'] == 9001 and not got['required']
    assert [p.name for p in got['params_files']] == ['foxglove.yaml']


@pytest.mark.parametrize('name, value, message', [
    ('port', 70000, r'^parameter port: 70000 is out of range: must be in \[0, 65535\]$'),
    ('max_image_rate_hz', -1.0,
     r'^parameter max_image_rate_hz: -1.0 is out of range: must be >= 0$'),
])
def test_a_bad_parameter_is_refused_by_name(name: str, value: Any, message: str) -> None:
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        with pytest.raises(ValueError, match=message):
            FoxgloveBridge(context=context, parameter_overrides=[Parameter(name, value=value)])
    finally:
        rclpy.shutdown(context=context)
