"""`iflybot_recorder`: records the configured topics to one rosbag2 MCAP bag per episode.

Services: `~/start_episode` (StartEpisode), `~/stop_episode` (StopEpisode),
`~/discard_episode` (std_srvs/Trigger). Subscriptions are raw (CDR bytes straight from the
middleware, never deserialised) and created from type names in the `topics` parameter
('TOPIC:pkg/msg/Type' or 'TOPIC:pkg/msg/Type:best_effort'). The callbacks only enqueue; the
bag is written by `EpisodeRecorder`'s thread. SIGINT/SIGTERM finalise the open episode.
Parameters: `SCHEMA` (a bad value fails the start naming it; docs/parameters.md).
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

import rclpy
from iflybot_vla_msgs.srv import StartEpisode, StopEpisode
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.subscription import MessageInfo
from std_srvs.srv import Trigger

from iflybot_vla_policy.data.bags import check_msgtype
from iflybot_vla_policy.data.episode_recorder import (
    EpisodeRecorder,
    RecorderConfig,
    RecorderError,
)
from iflybot_vla_policy.params import Param, Schema
from iflybot_vla_policy.ros.parameters import (
    ParameterError,
    load_parameters,
    unknown_parameters,
)

DEFAULT_TOPICS = (
    '/joint_states:sensor_msgs/msg/JointState',
    '/scene_camera/color/image_raw:sensor_msgs/msg/Image',
    '/scene_camera/color/camera_info:sensor_msgs/msg/CameraInfo',
    '/wrist_camera/color/image_raw:sensor_msgs/msg/Image',
    '/wrist_camera/color/camera_info:sensor_msgs/msg/CameraInfo',
    '/fr3_arm_controller/joint_trajectory:trajectory_msgs/msg/JointTrajectory',
    '/servo_node/delta_twist_cmds:geometry_msgs/msg/TwistStamped',
    '/vla/gripper_command:iflybot_vla_msgs/msg/GripperCommand',
    '/vla/instruction:std_msgs/msg/String',
    '/vla/action_chunk:iflybot_vla_msgs/msg/ActionChunk',
    '/sim/task_success:std_msgs/msg/Bool',
    '/sim/object_poses:iflybot_vla_msgs/msg/ObjectPoses',
)


def parse_topic_spec(spec: str) -> tuple[str, str, bool]:
    """'TOPIC:pkg/msg/Type[:best_effort|:reliable]' -> (topic, type, best_effort)."""
    parts = spec.split(':')
    if len(parts) not in (2, 3) or not parts[0].startswith('/'):
        raise ValueError(f"topics entry {spec!r} must be 'TOPIC:pkg/msg/Type' with an "
                         "optional ':best_effort'")
    reliability = parts[2] if len(parts) == 3 else 'reliable'
    if reliability not in ('reliable', 'best_effort'):
        raise ValueError(f"topics entry {spec!r}: QoS must be 'reliable' or 'best_effort'")
    try:
        msgtype = check_msgtype(parts[1])
    except ValueError as err:
        raise ValueError(f'topics entry {spec!r}: {err}') from err
    return parts[0], msgtype, reliability == 'best_effort'


def import_message(msgtype: str) -> Any:
    """'sensor_msgs/msg/Image' -> the rclpy message class."""
    package, _, name = msgtype.split('/')
    try:
        return getattr(importlib.import_module(f'{package}.msg'), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f'cannot import message type {msgtype}: {err}') from err


SCHEMA = Schema('iflybot_recorder', (
    Param('output_dir', 'recordings', 'directory holding one bag per episode and episodes.jsonl'),
    Param('topics', DEFAULT_TOPICS, "'TOPIC:pkg/msg/Type[:best_effort]' entries to record",
          check=parse_topic_spec),
    Param('compression', 'none', 'MCAP chunk compression', choices=('none', 'zstd')),
    Param('min_free_disk_gb', 2.0, 'refuse to start an episode below this much free disk',
          ge=0.0),
    Param('queue_size', 2000, 'messages waiting for the writer thread', ge=1),
    Param('queue_max_mb', 1024.0, 'bytes waiting for the writer thread, MB', gt=0.0),
    Param('robot', 'fr3', 'robot identifier stored in EpisodeInfo'),
    Param('flush_period_s', 0.1,
          'recorded messages reach the bag file within this many seconds (one MCAP chunk per '
          'flush): what a SIGKILLed recorder can lose, plus its queue', ge=0.0, le=60.0),
    Param('qos_depth', 100, 'subscription history depth', ge=1),
    Param('skip_published_before_start', True,
          'leave out messages published before start_episode (by their DDS source timestamp): '
          'a starved recorder still holds queued messages from before the episode, e.g. the '
          'pose before a reset; needs clocks synchronised across machines'),
))


class RecorderNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__('iflybot_recorder', **kwargs)
        p = load_parameters(self, SCHEMA)
        self.recorder = EpisodeRecorder(RecorderConfig(
            root=Path(p['output_dir']).expanduser(), compression=p['compression'],
            min_free_disk_gb=p['min_free_disk_gb'], queue_size=p['queue_size'],
            queue_max_mb=p['queue_max_mb'], robot=p['robot'],
            flush_period_s=p['flush_period_s']))
        self.received = 0
        self.skipped_before_start = 0
        self._skip_early = p['skip_published_before_start']
        self._start_wall_ns = 0
        self._subs = []
        for spec in p['topics']:
            topic, msgtype, best_effort = parse_topic_spec(spec)
            qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p['qos_depth'],
                             reliability=ReliabilityPolicy.BEST_EFFORT if best_effort
                             else ReliabilityPolicy.RELIABLE)
            events = SubscriptionEventCallbacks(message_lost=self._lost_callback(topic))
            self._subs.append(self.create_subscription(
                import_message(msgtype), topic, self._callback(topic, msgtype), qos, raw=True,
                event_callbacks=events))
        self.create_service(StartEpisode, '~/start_episode', self._on_start)
        self.create_service(StopEpisode, '~/stop_episode', self._on_stop)
        self.create_service(Trigger, '~/discard_episode', self._on_discard)
        self.get_logger().info(f'recording {len(self._subs)} topic(s) to '
                               f'{self.recorder.config.root} on request')

    def unknown_parameters(self) -> list[str]:
        """Params-file keys that are no parameter of this node (typos such as
        `flush_perod_s`), each named with the closest known name: not silently ignored."""
        return unknown_parameters(self, SCHEMA)

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _callback(self, topic: str, msgtype: str):
        put = self.recorder.put

        def on_message(data: bytes, info: MessageInfo) -> None:
            if not self.recorder.recording:
                return
            # Published before the episode started (queued while the executor was busy).
            if self._skip_early and 0 < info['source_timestamp'] < self._start_wall_ns:
                self.skipped_before_start += 1
                return
            self.received += 1
            put(topic, msgtype, self._now_ns(), data)
        return on_message

    def _lost_callback(self, topic: str):
        def on_lost(info: Any) -> None:
            self.recorder.note_lost(topic, int(info.total_count_change))
        return on_lost

    def _on_start(self, request: Any, response: Any) -> Any:
        self._start_wall_ns = time.time_ns()
        try:
            episode_id, path = self.recorder.start(
                self._now_ns(), task=request.task, instruction=request.instruction,
                operator_name=request.operator_name)
        except (RecorderError, OSError) as err:
            response.success, response.message = False, str(err)
            self.get_logger().warning(f'start_episode refused: {err}')
            return response
        response.success, response.message = True, f'recording {episode_id}'
        response.episode_id, response.path = episode_id, str(path)
        self.get_logger().info(f'recording episode {episode_id} to {path}')
        return response

    def _on_stop(self, request: Any, response: Any) -> Any:
        try:
            result = self.recorder.stop(self._now_ns(), request.success, request.notes)
        except RecorderError as err:
            response.success, response.message = False, str(err)
            return response
        response.success = not result.error
        response.message = result.summary()
        response.path = str(result.path)
        response.duration = result.duration
        response.message_count = result.message_count
        text = (f'episode {result.episode_id} ({"success" if request.success else "failure"}): '
                f'{result.summary()}')
        # rclpy rejects one call site logging at two severities: two call sites.
        if result.dropped or result.lost or result.error:
            self.get_logger().warning(text)
        else:
            self.get_logger().info(text)
        return response

    def _on_discard(self, _request: Any, response: Any) -> Any:
        try:
            episode_id = self.recorder.discard()
        except RecorderError as err:
            response.success, response.message = False, str(err)
            return response
        response.success, response.message = True, f'discarded {episode_id}'
        self.get_logger().info(f'discarded episode {episode_id}')
        return response

    def finalise(self, reason: str) -> None:
        """Close the open episode (success=false) so its bag is complete; used on shutdown."""
        if self.recorder.recording:
            result = self.recorder.stop(self._now_ns(), False, reason)
            print(f'iflybot_recorder: {reason}: finalised episode {result.episode_id}: '
                  f'{result.summary()}', file=sys.stderr)


def main(args: list[str] | None = None) -> int:
    from rclpy._rclpy_pybind11 import RCLError
    from rclpy.executors import ExternalShutdownException

    rclpy.init(args=args)   # rclpy's handlers turn SIGINT and SIGTERM into a shutdown
    try:
        node = RecorderNode()
    except ParameterError:      # the node logged which parameter
        rclpy.try_shutdown()
        return 1
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RCLError:
        if rclpy.ok():         # a signal can invalidate the context mid-wait: that is a shutdown
            raise
    finally:
        node.finalise('recorder shut down')
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
