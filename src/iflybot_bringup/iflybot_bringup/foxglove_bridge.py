"""A live view of a running graph in Foxglove, with no ROS install on the viewer's machine.

The node subscribes to what an operator watches (both cameras, /joint_states, the policy's
planned TCP path, /vla/status with its latencies, the instruction) and republishes each on a
channel of foxglove-sdk's WebSocket server (Foxglove WebSocket protocol, ws://HOST:8765): the
well-known Foxglove schemas where one exists (RawImage, JointStates, SceneUpdate), JSON with a
JSON schema otherwise. Foxglove (desktop or browser) connects to that address directly.
Graphs start it with `foxglove:=true` (docs/foxglove.md).

Conversions are plain functions of the messages, so the node only wires topics to channels;
foxglove is imported where it is used: without it, main() exits with what to install.
Parameters: `SCHEMA` (a bad value fails the start naming it; docs/parameters.md).
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rclpy.node import Node

from iflybot_vla_policy.params import Param, ParameterError, Schema

NODE_NAME = 'iflybot_foxglove'
MISSING_FOXGLOVE = ('foxglove_bridge needs the foxglove-sdk Python package (pinned in '
                    'requirements.txt): run scripts/setup.sh, or pip install -r requirements.txt')
STATE_NAMES = {0: 'IDLE', 1: 'RUNNING', 2: 'HOLD', 3: 'ERROR'}   # PolicyStatus.STATE_*

# JSON schema types of ROS field types (get_fields_and_field_types' spelling)
_JSON_TYPES = {'boolean': 'boolean', 'string': 'string', 'float': 'number', 'double': 'number'}
_INT_TYPES = ('octet', 'char', 'byte', 'int8', 'uint8', 'int16', 'uint16', 'int32', 'uint32',
              'int64', 'uint64')


# ----------------------------------------------------------------------------------- conversions

def stamp_ns(stamp: Any) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _timestamp(stamp: Any) -> Any:
    from foxglove.messages import Timestamp

    return Timestamp(sec=int(stamp.sec), nsec=int(stamp.nanosec))


def raw_image(msg: Any) -> Any:
    """sensor_msgs/Image -> foxglove.RawImage (same encoding names: rgb8, bgr8, mono8, ...)."""
    from foxglove.messages import RawImage

    return RawImage(timestamp=_timestamp(msg.header.stamp), frame_id=msg.header.frame_id,
                    width=int(msg.width), height=int(msg.height), encoding=msg.encoding,
                    step=int(msg.step), data=bytes(msg.data))


def joint_states(msg: Any) -> Any:
    """sensor_msgs/JointState -> foxglove.JointStates (missing fields stay unset)."""
    from foxglove.messages import JointState, JointStates

    def at(values: Sequence[float], i: int) -> float | None:
        return float(values[i]) if i < len(values) else None

    joints = [JointState(name=name, position=at(msg.position, i), velocity=at(msg.velocity, i),
                         effort=at(msg.effort, i))
              for i, name in enumerate(msg.name)]
    return JointStates(timestamp=_timestamp(msg.header.stamp), joints=joints)


def scene_update(msg: Any) -> Any:
    """visualization_msgs/MarkerArray (the policy's planned TCP path) -> foxglove.SceneUpdate.

    LINE_STRIP and SPHERE markers become line and sphere primitives of one entity per marker
    (id 'ns/id'); DELETE and DELETEALL become deletions. Other marker types are skipped.
    """
    from foxglove.messages import (
        Color,
        LinePrimitive,
        LinePrimitiveLineType,
        Point3,
        Pose,
        Quaternion,
        SceneEntity,
        SceneEntityDeletion,
        SceneEntityDeletionType,
        SceneUpdate,
        SpherePrimitive,
        Vector3,
    )

    line_strip, sphere, delete, delete_all = 4, 2, 2, 3   # visualization_msgs/Marker constants
    entities, deletions = [], []
    for marker in msg.markers:
        entity_id = f'{marker.ns}/{marker.id}'
        stamp = _timestamp(marker.header.stamp)
        if marker.action == delete_all:
            deletions.append(SceneEntityDeletion(timestamp=stamp,
                                                 type=SceneEntityDeletionType.All))
            continue
        if marker.action == delete:
            deletions.append(SceneEntityDeletion(timestamp=stamp, id=entity_id,
                                                 type=SceneEntityDeletionType.MatchingId))
            continue
        p, o, c = marker.pose.position, marker.pose.orientation, marker.color
        pose = Pose(position=Vector3(x=p.x, y=p.y, z=p.z),
                    orientation=Quaternion(x=o.x, y=o.y, z=o.z, w=o.w))
        color = Color(r=c.r, g=c.g, b=c.b, a=c.a)
        if marker.type == line_strip:
            primitive = {'lines': [LinePrimitive(
                type=LinePrimitiveLineType.LineStrip, pose=pose, thickness=marker.scale.x,
                color=color, points=[Point3(x=q.x, y=q.y, z=q.z) for q in marker.points])]}
        elif marker.type == sphere:
            primitive = {'spheres': [SpherePrimitive(
                pose=pose, size=Vector3(x=marker.scale.x, y=marker.scale.y, z=marker.scale.z),
                color=color)]}
        else:
            continue
        entities.append(SceneEntity(timestamp=stamp, frame_id=marker.header.frame_id,
                                    id=entity_id, **primitive))
    return SceneUpdate(deletions=deletions, entities=entities)


def message_dict(msg: Any) -> Any:
    """Any ROS message -> JSON-ready dict (nested messages, arrays as lists, bytes as ints)."""
    if hasattr(msg, 'get_fields_and_field_types'):
        return {name: message_dict(getattr(msg, name))
                for name in msg.get_fields_and_field_types()}
    if isinstance(msg, (bytes, bytearray)):
        return list(msg)
    if hasattr(msg, 'tolist'):            # numpy arrays (float64[]) and array.array
        return msg.tolist()
    if isinstance(msg, (list, tuple)):
        return [message_dict(v) for v in msg]
    return msg


def json_schema(msg_type: type, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON schema of a ROS message type's fields (Foxglove's panels use it to list fields).

    Only the field names and primitive types: nested messages are objects, sequences arrays.
    """
    properties: dict[str, Any] = {}
    for name, kind in msg_type.get_fields_and_field_types().items():
        base = kind.split('<')[0].split('[')[0]
        if kind != base or kind.startswith('sequence'):
            properties[name] = {'type': 'array'}
        elif base in _JSON_TYPES:
            properties[name] = {'type': _JSON_TYPES[base]}
        elif base in _INT_TYPES:
            properties[name] = {'type': 'integer'}
        else:
            properties[name] = {'type': 'object'}
    properties.update(extra or {})
    return {'type': 'object', 'properties': properties}


def status_dict(msg: Any) -> dict[str, Any]:
    """iflybot_vla_msgs/PolicyStatus -> dict, plus `state_name` (IDLE, RUNNING, HOLD, ERROR)."""
    out = message_dict(msg)
    out['state_name'] = STATE_NAMES.get(int(msg.state), f'UNKNOWN({int(msg.state)})')
    return out


# ----------------------------------------------------------------------------------- node

def _not_empty(value: str) -> None:
    if not value:
        raise ValueError('must not be empty')


SCHEMA = Schema(NODE_NAME, (
    Param('host', '0.0.0.0', 'address the WebSocket server binds (0.0.0.0: every interface; '
          '127.0.0.1: this machine only)', check=_not_empty),
    Param('port', 8765, 'TCP port of the WebSocket server (Foxglove: ws://HOST:PORT); 0 picks a '
          'free one (logged)', ge=0, le=65535),
    Param('image_topics', ('/scene_camera/color/image_raw', '/wrist_camera/color/image_raw'),
          'sensor_msgs/Image topics, each republished as foxglove.RawImage on the same name',
          check=_not_empty),
    Param('max_image_rate_hz', 10.0, 'most frames per second sent per camera (0: every '
          'frame); raw frames are large, and a remote viewer needs few', ge=0.0),
    Param('joint_states_topic', '/joint_states', 'sensor_msgs/JointState -> '
          'foxglove.JointStates', check=_not_empty),
    Param('markers_topic', '/vla/markers', "the policy's planned TCP path (MarkerArray) -> "
          'foxglove.SceneUpdate', check=_not_empty),
    Param('status_topic', '/vla/status', 'iflybot_vla_msgs/PolicyStatus -> JSON',
          check=_not_empty),
    Param('instruction_topic', '/vla/instruction', 'std_msgs/String -> JSON, repeated every '
          'second so that a viewer who connects later sees it', check=_not_empty),
))


class FoxgloveBridge(Node):
    """Topics -> channels of one WebSocket server. A conversion runs only while a client
    subscribes to its channel, so an unwatched bridge costs the subscriptions alone."""

    def __init__(self, **kwargs: Any) -> None:
        import foxglove
        from foxglove import channels as fox_channels
        from iflybot_vla_msgs.msg import PolicyStatus
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String
        from visualization_msgs.msg import MarkerArray

        from iflybot_vla_policy.ros.parameters import load_parameters

        super().__init__(NODE_NAME, **kwargs)
        p = load_parameters(self, SCHEMA)      # ParameterError naming a bad one (logged)
        rate = p['max_image_rate_hz']
        self._min_image_period = 1.0 / rate if rate > 0.0 else 0.0
        self._last_image: dict[str, float] = {}
        self._last_instruction: str | None = None
        self._lock = threading.Lock()
        ctx = self._fox_context = foxglove.Context()   # its own: one server per node
        self.server = foxglove.start_server(name=NODE_NAME, host=p['host'], port=p['port'],
                                            context=ctx)
        self.port = self.server.port
        self.get_logger().info(f'Foxglove live view on ws://{p["host"]}:{self.port} '
                               f'(Foxglove: Open connection, Foxglove WebSocket)')
        self.handles: list[Any] = []
        for topic in p['image_topics']:
            channel = fox_channels.RawImageChannel(topic, context=ctx)
            self._subscribe(Image, topic, self._image_callback(topic, channel),
                            qos_profile_sensor_data)
        joints = fox_channels.JointStatesChannel(p['joint_states_topic'], context=ctx)
        self._subscribe(JointState, p['joint_states_topic'], self._forward(joints, joint_states),
                        qos_profile_sensor_data)
        path = fox_channels.SceneUpdateChannel(p['markers_topic'], context=ctx)
        self._subscribe(MarkerArray, p['markers_topic'], self._forward(path, scene_update), 10)
        status = foxglove.Channel(p['status_topic'], context=ctx, schema=json_schema(
            PolicyStatus, {'state_name': {'type': 'string'}}))
        self._subscribe(PolicyStatus, p['status_topic'], self._forward(status, status_dict), 10)
        self.instruction_channel = foxglove.Channel(p['instruction_topic'], context=ctx,
                                                    schema=json_schema(String))
        self._subscribe(String, p['instruction_topic'], self._on_instruction, 10)
        self.handles.append(self.create_timer(1.0, self._repeat_instruction))

    def _subscribe(self, msg_type: type, topic: str, callback: Callable[[Any], None],
                   qos: Any) -> None:
        self.handles.append(self.create_subscription(msg_type, topic, callback, qos))

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _forward(self, channel: Any, convert: Callable[[Any], Any]) -> Callable[[Any], None]:
        def callback(msg: Any) -> None:
            if channel.has_sinks():
                channel.log(convert(msg), log_time=self._now_ns())
        return callback

    def _image_callback(self, topic: str, channel: Any) -> Callable[[Any], None]:
        def callback(msg: Any) -> None:
            if not channel.has_sinks():
                return
            now = time.monotonic()
            if now - self._last_image.get(topic, -1e9) < self._min_image_period:
                return
            self._last_image[topic] = now
            channel.log(raw_image(msg), log_time=self._now_ns())
        return callback

    def _on_instruction(self, msg: Any) -> None:
        with self._lock:
            self._last_instruction = msg.data
        self._log_instruction(msg.data)

    def _repeat_instruction(self) -> None:
        with self._lock:
            text = self._last_instruction
        if text is not None:
            self._log_instruction(text)

    def _log_instruction(self, text: str) -> None:
        if self.instruction_channel.has_sinks():
            self.instruction_channel.log({'data': text}, log_time=self._now_ns())

    def destroy_node(self) -> None:
        if hasattr(self, 'server'):      # not when a bad parameter failed the constructor
            self.server.stop()
        super().destroy_node()


def main(argv: list[str] | None = None) -> int:
    try:
        import foxglove  # noqa: F401 (checked before rclpy starts)
    except ImportError:
        print(MISSING_FOXGLOVE, file=sys.stderr)
        return 2
    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init(args=argv if argv is not None else sys.argv)
    node = None
    try:
        node = FoxgloveBridge()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ParameterError:              # the node logged which parameter and why
        return 2
    except ValueError as exc:
        print(f'{NODE_NAME}: {exc}', file=sys.stderr)
        return 2
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
