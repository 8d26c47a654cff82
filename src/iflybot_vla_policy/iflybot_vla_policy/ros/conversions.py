"""ROS message <-> core data conversions for the policy node (no model or safety logic here).

Images convert without cv_bridge (it is not installable from PyPI for ROS 2) for the encodings
cameras and our simulator use; when cv_bridge is importable it is used instead. Row padding
(`step` > width * channels) is honoured.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from geometry_msgs.msg import Point, TwistStamped
from iflybot_vla_msgs.msg import ActionChunk, GripperCommand
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import ColorRGBA, Header
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
from visualization_msgs.msg import Marker, MarkerArray

from iflybot_vla_policy.robot import RobotSpec
from iflybot_vla_policy.safety import Trajectory

# encoding -> (channels, index of R, G, B in the source channels)
ENCODINGS: dict[str, tuple[int, tuple[int, int, int]]] = {
    'rgb8': (3, (0, 1, 2)),
    'bgr8': (3, (2, 1, 0)),
    'rgba8': (4, (0, 1, 2)),
    'bgra8': (4, (2, 1, 0)),
    'mono8': (1, (0, 0, 0)),
}

_cv_bridge = None
_cv_bridge_checked = False


def _bridge():
    """A CvBridge when cv_bridge imports (a full ROS 2 install), else None."""
    global _cv_bridge, _cv_bridge_checked
    if not _cv_bridge_checked:
        _cv_bridge_checked = True
        try:
            _cv_bridge = importlib.import_module('cv_bridge').CvBridge()
        except Exception:   # not installed, or PyPI's broken ROS 1 copy
            _cv_bridge = None
    return _cv_bridge


def image_to_rgb(msg: Image, use_cv_bridge: bool | None = None) -> np.ndarray:
    """sensor_msgs/Image -> uint8 (height, width, 3) RGB, a fresh contiguous array.

    use_cv_bridge: None = when importable, False = never, True = required.
    """
    bridge = _bridge() if use_cv_bridge is not False else None
    if use_cv_bridge and bridge is None:
        raise RuntimeError('use_cv_bridge=True but cv_bridge is not importable')
    if bridge is not None:
        return np.ascontiguousarray(bridge.imgmsg_to_cv2(msg, desired_encoding='rgb8'))
    encoding = msg.encoding.lower()
    if encoding not in ENCODINGS:
        raise ValueError(f'unsupported image encoding {msg.encoding!r}; supported without '
                         f'cv_bridge: {sorted(ENCODINGS)}')
    channels, rgb = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row = width * channels
    if height == 0 or width == 0:
        raise ValueError(f'empty image ({width}x{height})')
    if step < row:
        raise ValueError(f'image step {step} is smaller than width * channels = {row} '
                         f'for {encoding} {width}x{height}')
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size < step * (height - 1) + row:
        raise ValueError(f'image data has {data.size} bytes; {encoding} {width}x{height} with '
                         f'step {step} needs {step * height}')
    rows = np.lib.stride_tricks.as_strided(data, shape=(height, row), strides=(step, 1))
    pixels = rows.reshape(height, width, channels)
    if encoding == 'rgb8':
        return pixels.copy()
    if encoding == 'mono8':
        return np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, list(rgb)])


def rgb_to_image(rgb: np.ndarray, encoding: str = 'rgb8', stamp: Time | None = None,
                 frame_id: str = '', step: int | None = None) -> Image:
    """uint8 (height, width, 3) RGB -> sensor_msgs/Image in `encoding`, rows padded to `step`."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f'expected uint8 (height, width, 3), got {rgb.dtype} {rgb.shape}')
    encoding = encoding.lower()
    if encoding not in ENCODINGS:
        raise ValueError(f'unsupported image encoding {encoding!r}; supported: '
                         f'{sorted(ENCODINGS)}')
    channels, order = ENCODINGS[encoding]
    height, width = rgb.shape[:2]
    if encoding == 'mono8':
        pixels = rgb.mean(axis=2, keepdims=True).round().astype(np.uint8)
    else:
        pixels = np.empty((height, width, channels), dtype=np.uint8)
        pixels[:, :, list(order)] = rgb
        if channels == 4:
            pixels[:, :, 3] = 255
    row = width * channels
    step = row if step is None else int(step)
    if step < row:
        raise ValueError(f'step {step} is smaller than width * channels = {row}')
    buffer = np.zeros((height, step), dtype=np.uint8)
    buffer[:, :row] = pixels.reshape(height, row)
    msg = Image()
    msg.header = Header(stamp=stamp or Time(), frame_id=frame_id)
    msg.height, msg.width, msg.encoding, msg.is_bigendian, msg.step = (
        height, width, encoding, 0, step)
    msg.data = buffer.tobytes()
    return msg


def joint_positions(msg: JointState, names: Sequence[str]) -> np.ndarray:
    """Positions (len(names),) float64 in the order of `names`; missing joints raise."""
    index = {name: i for i, name in enumerate(msg.name)}
    missing = [n for n in names if n not in index]
    if missing:
        raise KeyError(f'joint state lacks joint(s) {missing}; it has {list(msg.name)}')
    if len(msg.position) < len(msg.name):
        raise ValueError(f'joint state has {len(msg.name)} names but {len(msg.position)} '
                         'positions')
    position = np.asarray(msg.position, dtype=np.float64)[[index[n] for n in names]]
    bad = [f'{n} = {v}' for n, v in zip(names, position, strict=True) if not np.isfinite(v)]
    if bad:   # an encoder glitch or a driver bug: never a state to plan or brake from
        raise ValueError(f'joint state has non-finite position(s): {", ".join(bad)}')
    return position


def robot_state(msg: JointState, arm_names: Sequence[str],
                finger_names: Sequence[str]) -> np.ndarray:
    """The core's state vector (len(arm) + 1,) float32: arm joints + gripper opening (m)."""
    arm = joint_positions(msg, arm_names)
    width = float(joint_positions(msg, finger_names).sum()) if finger_names else 0.0
    return np.append(arm, width).astype(np.float32)


def duration(seconds: float) -> Duration:
    nanos = int(round(seconds * 1e9))
    return Duration(sec=nanos // 1_000_000_000, nanosec=nanos % 1_000_000_000)


def trajectory_msg(trajectory: Trajectory, joint_names: Sequence[str],
                   stamp: Time | None = None) -> JointTrajectory:
    """Trajectory knots -> JointTrajectory (stamp zero: the controller starts it on receipt)."""
    if trajectory.positions.shape[1] != len(joint_names):
        raise ValueError(f'trajectory has {trajectory.positions.shape[1]} joints, '
                         f'{len(joint_names)} names given')
    msg = JointTrajectory()
    msg.header = Header(stamp=stamp or Time())
    msg.joint_names = list(joint_names)
    points = []
    for t, p, v in zip(trajectory.times, trajectory.positions, trajectory.velocities,
                       strict=True):
        points.append(JointTrajectoryPoint(positions=p.tolist(), velocities=v.tolist(),
                                           time_from_start=duration(float(t))))
    msg.points = points
    return msg


def trajectory_from_msg(msg: JointTrajectory, start: float = 0.0) -> Trajectory:
    """JointTrajectory -> Trajectory (for tests and tools that check what was sent)."""
    times = np.array([p.time_from_start.sec + p.time_from_start.nanosec * 1e-9
                      for p in msg.points])
    positions = np.array([list(p.positions) for p in msg.points], dtype=np.float64)
    velocities = np.array([list(p.velocities) for p in msg.points], dtype=np.float64)
    return Trajectory(start, times, positions, velocities)


def action_chunk_msg(actions: np.ndarray, dt: float, joint_names: Sequence[str],
                     stamp: Time | None = None, model_id: str = '',
                     inference_latency_ms: float = 0.0) -> ActionChunk:
    """Chunk (horizon, n + 1) -> ActionChunk: n action columns + the gripper width column."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] < 2:
        raise ValueError(f'chunk must be (horizon, dim + 1), got {actions.shape}')
    msg = ActionChunk()
    msg.header = Header(stamp=stamp or Time())
    msg.joint_names = list(joint_names)
    msg.horizon = actions.shape[0]
    msg.action_dim = actions.shape[1] - 1
    msg.dt = float(dt)
    msg.positions = actions[:, :-1].ravel().tolist()
    msg.gripper = actions[:, -1].tolist()
    msg.model_id = model_id
    msg.inference_latency_ms = float(inference_latency_ms)
    return msg


def twist_msg(twist: np.ndarray, stamp: Time | None = None,
              frame_id: str = 'fr3_link0') -> TwistStamped:
    """(6,) [vx, vy, vz, wx, wy, wz] in the base frame -> TwistStamped."""
    twist = np.asarray(twist, dtype=np.float64)
    if twist.shape != (6,):
        raise ValueError(f'twist must be (6,), got {twist.shape}')
    msg = TwistStamped()
    msg.header = Header(stamp=stamp or Time(), frame_id=frame_id)
    msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(x) for x in twist[:3])
    msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = (float(x) for x in twist[3:])
    return msg


def gripper_command_msg(width: float, speed: float, force: float, grasp: bool,
                        stamp: Time | None = None) -> GripperCommand:
    return GripperCommand(header=Header(stamp=stamp or Time()), width=float(width),
                          speed=float(speed), force=float(force), grasp=bool(grasp))


def path_markers(robot: RobotSpec, joint_path: np.ndarray, stamp: Time | None = None,
                 frame_id: str = 'fr3_link0', namespace: str = 'vla_plan') -> MarkerArray:
    """Planned TCP path for RViz from a joint path (k, n_joints) via forward kinematics."""
    joint_path = np.asarray(joint_path, dtype=np.float64)
    header = Header(stamp=stamp or Time(), frame_id=frame_id)
    points = [Point(x=float(x), y=float(y), z=float(z))
              for x, y, z in robot.tcp_position(joint_path)] if len(joint_path) else []
    line = Marker(header=header, ns=namespace, id=0, type=Marker.LINE_STRIP,
                  action=Marker.ADD if len(points) >= 2 else Marker.DELETE)
    line.pose.orientation.w = 1.0
    line.scale.x = 0.005
    line.color = ColorRGBA(r=0.1, g=0.8, b=0.2, a=1.0)
    line.points = points if len(points) >= 2 else []
    end = Marker(header=header, ns=namespace, id=1, type=Marker.SPHERE,
                 action=Marker.ADD if points else Marker.DELETE)
    end.pose.orientation.w = 1.0
    if points:
        end.pose.position = points[-1]
    end.scale.x = end.scale.y = end.scale.z = 0.02
    end.color = ColorRGBA(r=0.9, g=0.3, b=0.1, a=1.0)
    return MarkerArray(markers=[line, end])
