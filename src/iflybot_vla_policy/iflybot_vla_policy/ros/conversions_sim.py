"""Messages <-> the simulator core's types (sim/): joint states, images, trajectories, twists."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose
from iflybot_vla_msgs.msg import ObjectPoses
from sensor_msgs.msg import CameraInfo, Image, JointState
from trajectory_msgs.msg import JointTrajectory as JointTrajectoryMsg

from iflybot_vla_policy.sim.env import CameraInfo as SimCameraInfo
from iflybot_vla_policy.sim.tasks import ObjectState
from iflybot_vla_policy.sim.trajectory import JointTrajectory, make_trajectory


def to_time(seconds: float) -> Time:
    sec = int(np.floor(seconds))
    return Time(sec=sec, nanosec=min(int(round((seconds - sec) * 1e9)), 999_999_999))


def from_time(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def joint_state_msg(names: tuple[str, ...], positions: np.ndarray, velocities: np.ndarray,
                    efforts: np.ndarray, stamp: float) -> JointState:
    msg = JointState()
    msg.header.stamp = to_time(stamp)
    msg.name = list(names)
    msg.position = positions.tolist()
    msg.velocity = velocities.tolist()
    msg.effort = efforts.tolist()
    return msg


def image_msg(rgb: np.ndarray, stamp: float, frame_id: str) -> Image:
    """uint8 (H, W, 3) RGB -> sensor_msgs/Image rgb8."""
    msg = Image()
    msg.header.stamp = to_time(stamp)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = 'rgb8'
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg


def camera_info_msg(info: SimCameraInfo, stamp: float, frame_id: str) -> CameraInfo:
    msg = CameraInfo()
    msg.header.stamp = to_time(stamp)
    msg.header.frame_id = frame_id
    msg.width, msg.height = info.width, info.height
    msg.distortion_model = 'plumb_bob'
    msg.d = [0.0] * 5
    msg.k = [info.fx, 0.0, info.cx, 0.0, info.fy, info.cy, 0.0, 0.0, 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [info.fx, 0.0, info.cx, 0.0, 0.0, info.fy, info.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


def trajectory_from_msg(msg: JointTrajectoryMsg, time_offset: float) -> JointTrajectory:
    """JointTrajectory msg -> core trajectory; the header stamp (sim clock) becomes env time by
    subtracting `time_offset`; stamp 0 stays 0 (= now). Raises TrajectoryError if malformed.
    """
    stamp = from_time(msg.header.stamp)
    start = 0.0 if stamp == 0.0 else max(stamp - time_offset, 1e-9)
    times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
    return make_trajectory(
        list(msg.joint_names), times, [list(p.positions) for p in msg.points],
        [list(p.velocities) for p in msg.points],
        [list(p.accelerations) for p in msg.points], start_time=start)


def object_poses_msg(objects: Sequence[ObjectState], stamp: float,
                     frame_id: str = 'fr3_link0') -> ObjectPoses:
    """The scene's objects (base frame) -> ObjectPoses, in the order given."""
    msg = ObjectPoses()
    msg.header.stamp = to_time(stamp)
    msg.header.frame_id = frame_id
    for obj in objects:
        pose = Pose()
        pose.position.x, pose.position.y, pose.position.z = (float(v) for v in obj.position)
        w, x, y, z = (float(v) for v in obj.quaternion)
        pose.orientation.w, pose.orientation.x = w, x
        pose.orientation.y, pose.orientation.z = y, z
        msg.names.append(obj.name)
        msg.poses.append(pose)
    return msg


def object_poses_from_msg(msg: ObjectPoses) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ObjectPoses -> name: (position (3,), quaternion (4,) w, x, y, z)."""
    if len(msg.names) != len(msg.poses):
        raise ValueError(f'object poses: {len(msg.names)} names for {len(msg.poses)} poses')
    out = {}
    for name, pose in zip(msg.names, msg.poses, strict=True):
        p, q = pose.position, pose.orientation
        out[name] = (np.array([p.x, p.y, p.z]), np.array([q.w, q.x, q.y, q.z]))
    return out
