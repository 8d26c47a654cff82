"""A synthetic but realistic recorded episode, written straight to a bag (no DDS).

The arm follows a commanded JointTrajectory with a first-order lag (as a tracking controller
would), the gripper closes on a GripperCommand, two cameras render a frame whose content encodes
time. Used by the conversion tests; the DDS recording tests use the simulator instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from iflybot_vla_policy.data import bags
from iflybot_vla_policy.robot import load_robot

ROBOT = load_robot()
T0_NS = 1_700_000_000_000_000_000          # episode start on the bag clock
TRAJ_START = 0.5                           # s after T0: the trajectory's header stamp
TRAJ_TIMES = np.array([0.4, 0.8, 1.2])     # time_from_start of its points
TRAJ_DELTA = np.array([[0.1, -0.05, 0.0, 0.08, 0.0, 0.1, -0.1],
                       [0.2, -0.10, 0.05, 0.16, 0.0, 0.2, -0.2],
                       [0.3, -0.12, 0.05, 0.20, 0.1, 0.25, -0.2]])
GRIPPER_AT = 1.0                           # s: close command
DURATION = 2.2


def commanded(t: np.ndarray | float) -> np.ndarray:
    """Ground-truth arm setpoint at times t (s after T0) -> (..., 7), linear between points."""
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    times = np.concatenate([[TRAJ_START], TRAJ_START + TRAJ_TIMES])
    pos = np.vstack([ROBOT.home, ROBOT.home + TRAJ_DELTA])
    return np.stack([np.interp(t, times, pos[:, j]) for j in range(7)], axis=-1)


def commanded_gripper(t: np.ndarray | float) -> np.ndarray:
    return np.where(np.atleast_1d(t) >= GRIPPER_AT, 0.02, 0.08)


def _stamp(t: float, clock_ns: int = T0_NS) -> object:
    ns = clock_ns + round(t * 1e9)
    return bags.make_message('builtin_interfaces/msg/Time', sec=ns // 10**9, nanosec=ns % 10**9)


def _header(t: float, frame: str = '', clock_ns: int = T0_NS) -> object:
    return bags.make_message('std_msgs/msg/Header', stamp=_stamp(t, clock_ns), frame_id=frame)


def _duration(s: float) -> object:
    ns = round(s * 1e9)
    return bags.make_message('builtin_interfaces/msg/Duration', sec=ns // 10**9,
                             nanosec=ns % 10**9)


def frame_image(t: float, cam_level: int, h: int = 48, w: int = 64) -> np.ndarray:
    """(h, w, 3) uint8 whose green bar position encodes t (10 px per 0.1 s, wrapping)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :, 0] = cam_level
    x = int(round(t * 100)) % (w - 4)
    img[:, x:x + 4, 1] = 255
    return img


def write_synthetic_bag(path: Path, success: bool = True, js_rate: float = 200.0,
                        cam_rate: float = 30.0, instruction: str = 'put the red cube in the bowl',
                        with_trajectory: bool = True, sim_clock: bool = False) -> Path:
    """Write one episode bag; returns its path.

    sim_clock: messages are stamped on a simulator clock starting at 100 s while the bag's
    receive times stay on wall time, and the trajectory is stamped 0 ("start now").
    """
    stamp_clock = 100 * 10**9 if sim_clock else T0_NS
    writer = bags.BagWriter(path)
    store = bags.typestore()
    names = [*ROBOT.arm_joint_names, *ROBOT.finger_joint_names]

    def put(topic: str, msgtype: str, t: float, msg: object) -> None:
        writer.write(topic, msgtype, T0_NS + round(t * 1e9),
                     bytes(store.serialize_cdr(msg, msgtype)))

    put(bags.EPISODE_INFO_TOPIC, bags.EPISODE_INFO_TYPE, 0.0, bags.episode_info_message(
        {'episode_id': path.name, 'task': 'pick_place', 'instruction': instruction,
         'operator_name': 'expert', 'robot': 'fr3_sim'}))
    put('/vla/instruction', 'std_msgs/msg/String', 0.0,
        bags.make_message('std_msgs/msg/String', data=instruction))
    events: list[tuple[float, str]] = []
    events += [(k / js_rate, 'js') for k in range(int(DURATION * js_rate) + 1)]
    events += [(0.003 + k / cam_rate, 'cam') for k in range(int(DURATION * cam_rate))]
    if with_trajectory:
        events.append((TRAJ_START, 'traj'))
    events.append((GRIPPER_AT, 'grip'))
    q = ROBOT.home.copy()
    width = 0.08
    last_t = 0.0
    for t, kind in sorted(events):
        # first-order tracking of the setpoint (time constant 30 ms)
        alpha = 1.0 - np.exp(-(t - last_t) / 0.03)
        target = commanded(t)[0] if with_trajectory else ROBOT.home + TRAJ_DELTA[0] * min(t, 1)
        q = q + alpha * (target - q)
        width = width + alpha * (commanded_gripper(t)[0] - width)
        last_t = t
        if kind == 'js':
            put('/joint_states', 'sensor_msgs/msg/JointState', t, bags.make_message(
                'sensor_msgs/msg/JointState', header=_header(t, clock_ns=stamp_clock), name=names,
                position=np.array([*q, width / 2, width / 2]), velocity=np.zeros(0),
                effort=np.zeros(0)))
        elif kind == 'cam':
            for topic, level in (('/scene_camera/color/image_raw', 40),
                                 ('/wrist_camera/color/image_raw', 200)):
                img = frame_image(t, level)
                put(topic, 'sensor_msgs/msg/Image', t + 0.002, bags.make_message(
                    'sensor_msgs/msg/Image', header=_header(t, topic.split('/')[1], stamp_clock),
                    height=img.shape[0], width=img.shape[1], encoding='rgb8', is_bigendian=0,
                    step=img.shape[1] * 3, data=img.reshape(-1)))
        elif kind == 'traj':
            points = [bags.make_message(
                'trajectory_msgs/msg/JointTrajectoryPoint',
                positions=ROBOT.home + d, velocities=np.zeros(0), accelerations=np.zeros(0),
                effort=np.zeros(0), time_from_start=_duration(tf))
                for d, tf in zip(TRAJ_DELTA, TRAJ_TIMES, strict=True)]
            put('/fr3_arm_controller/joint_trajectory', 'trajectory_msgs/msg/JointTrajectory',
                t, bags.make_message('trajectory_msgs/msg/JointTrajectory',
                                     header=_header(t, clock_ns=stamp_clock) if not sim_clock
                                     else bags.make_message('std_msgs/msg/Header',
                                                            stamp=_stamp(0, 0), frame_id=''),
                                     joint_names=list(ROBOT.arm_joint_names), points=points))
        elif kind == 'grip':
            put('/vla/gripper_command', 'iflybot_vla_msgs/msg/GripperCommand', t,
                bags.make_message('iflybot_vla_msgs/msg/GripperCommand',
                                  header=_header(t, clock_ns=stamp_clock), width=0.02, speed=0.1,
                                  force=20.0, grasp=True))
    put(bags.EPISODE_INFO_TOPIC, bags.EPISODE_INFO_TYPE, DURATION, bags.episode_info_message(
        {'episode_id': path.name, 'task': 'pick_place', 'instruction': instruction,
         'success': success, 'operator_name': 'expert', 'robot': 'fr3_sim',
         'duration': DURATION}))
    writer.close()
    return path
