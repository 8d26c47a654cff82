"""Recorded episodes (rosbag2 bags) -> aligned frames -> LeRobot v3.0 dataset.

Time base: a message's time is its header stamp when it has a non-zero one (cameras, joint
states, commands), else its receive time in the bag; the recorder runs on the same clock as the
robot or simulator (`use_sim_time` with the simulator), so both agree. Frames sit on a regular
grid at `fps` over the span where joint states and every camera overlap. At each frame time:
- images: each camera's image with the nearest stamp;
- state: joint states linearly interpolated (7 arm joints + gripper width = sum of fingers);
- action (`command`): the commanded setpoint `lead` frames ahead: the JointTrajectory in force
  then, interpolated like a JointTrajectoryController (cubic Hermite with velocities, linear
  without; from the measured state at the trajectory's start to its first point; holding the
  last point), and the last GripperCommand width (the measured width before the first one);
- action (`next_state`): the interpolated state `lead` frames ahead (teleop through Servo);
- `auto` picks `command` when the bag holds trajectories, else `next_state`.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iflybot_vla_policy.data import bags
from iflybot_vla_policy.data.lerobot_format import EpisodeData
from iflybot_vla_policy.observation_sync import frame_period, nearest_index, skew_limit

DEFAULT_CAMERAS = {'/scene_camera/color/image_raw': 'scene_camera',
                   '/wrist_camera/color/image_raw': 'wrist_camera'}
ACTION_SOURCES = ('auto', 'command', 'next_state')


@dataclass(frozen=True)
class ConvertConfig:
    fps: int = 30
    action_source: str = 'auto'
    action_lead_frames: int = 1           # action at frame t is the target for frame t + lead
    success_only: bool = False
    cameras: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CAMERAS))
    image_size: tuple[int, int] | None = None   # (H, W) resize; None keeps the camera size
    joint_states_topic: str = '/joint_states'
    trajectory_topic: str = '/fr3_arm_controller/joint_trajectory'
    gripper_topic: str = '/vla/gripper_command'
    instruction_topic: str = '/vla/instruction'
    max_image_age_s: float = 0.5          # a frame without an image this close is an error
                                          # (0: the node's limit, observation_sync)
    max_clock_skew_s: float = 1.0         # command stamps further than this from their receive
                                          # time are on another clock: use the receive time
    min_frames: int = 2

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError(f'fps must be positive, got {self.fps}')
        if self.action_source not in ACTION_SOURCES:
            raise ValueError(f'action_source must be one of {ACTION_SOURCES}, got '
                             f'{self.action_source!r}')
        if self.action_lead_frames < 0:
            raise ValueError(f'action_lead_frames must be >= 0, got {self.action_lead_frames}')
        if not self.cameras:
            raise ValueError('cameras must name at least one image topic')


class ConversionError(ValueError):
    """An episode that cannot be turned into frames; says which bag and why."""


def _stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _header_stamp_from_cdr(data: bytes) -> int:
    """Stamp of a message whose first field is a std_msgs/Header, without deserialising it."""
    sec, nanosec = struct.unpack_from('<iI' if data[1] else '>iI', data, 4)
    return sec * 1_000_000_000 + nanosec


def _decode(bag: Path, m: bags.BagMessage) -> Any:
    """m.decode(), with the bag and the message named when its bytes do not decode."""
    try:
        return m.decode()
    except bags.BagError as err:
        raise bags.BagError(f'bag {bag}: a {m.topic} message logged at {m.timestamp_ns} ns does '
                            f'not decode ({err}); `iflybot bag-repair {bag}` drops it') from err


def image_to_rgb(msg: Any) -> np.ndarray:
    """sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8) -> (H, W, 3) uint8 RGB."""
    channels = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1}
    if msg.encoding not in channels:
        raise ConversionError(f'unsupported image encoding {msg.encoding!r} '
                              f'(supported: {sorted(channels)})')
    c = channels[msg.encoding]
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
    img = rows[:, :msg.width * c].reshape(msg.height, msg.width, c)
    if msg.encoding == 'mono8':
        return np.repeat(img, 3, axis=2)
    if msg.encoding.startswith('bgr'):
        img = img[:, :, 2::-1]
    return np.ascontiguousarray(img[:, :, :3])


def resize_images(images: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, h, w, 3) uint8 (bilinear); unchanged when size is None."""
    if size is None or images.shape[1:3] == tuple(size):
        return images
    from PIL import Image

    h, w = size
    return np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR))
                     for im in images])


@dataclass
class _Trajectory:
    start: float                  # s
    times: np.ndarray             # (P,) s from start
    positions: np.ndarray         # (P, n_arm), NaN where the message does not name the joint
    velocities: np.ndarray | None  # (P, n_arm) or None


@dataclass
class RecordedEpisode:
    """The decoded streams of one bag that conversion needs (times in s, bag clock)."""

    bag: Path
    info: dict[str, Any]
    js_t: np.ndarray                          # (N,)
    js_q: np.ndarray                          # (N, 8): 7 joints + gripper width
    image_t: dict[str, np.ndarray]            # camera -> (M,) sorted stamps
    image_log_index: dict[str, np.ndarray]    # camera -> (M,) position in the bag's log order
    trajectories: list[_Trajectory]
    gripper_t: np.ndarray                     # (G,)
    gripper_w: np.ndarray                     # (G,)
    instruction: str
    t_origin_ns: int


def receive_to_stamp_map(pairs: list[tuple[int, int]]) -> Callable[[int], int]:
    """(stamp, receive time) pairs of one stream -> function receive time -> stamp (ns).

    Piecewise linear through the pairs (sorted by receive time), slope 1 beyond them; the
    identity when there are none.
    """
    if not pairs:
        return lambda r: int(r)
    arr = np.array(sorted(pairs, key=lambda p: p[1]), dtype=np.int64)   # (N, 2)
    s0, r0 = int(arr[0, 0]), int(arr[0, 1])
    stamps = (arr[:, 0] - s0).astype(np.float64)
    received = (arr[:, 1] - r0).astype(np.float64)

    def to_stamp(r: int) -> int:
        x = float(r - r0)
        if x <= received[0]:
            return s0 + int(stamps[0] + x - received[0])
        if x >= received[-1]:
            return s0 + int(stamps[-1] + x - received[-1])
        return s0 + int(np.interp(x, received, stamps))
    return to_stamp


def read_episode(bag: Path, config: ConvertConfig, arm_joints: Sequence[str],
                 finger_joints: Sequence[str]) -> RecordedEpisode:
    """First pass over a bag: everything but the image pixels."""
    topics = {config.joint_states_topic, config.trajectory_topic, config.gripper_topic,
              config.instruction_topic, bags.EPISODE_INFO_TOPIC, *config.cameras}
    # (header stamp, receive time) pairs, resolved to one clock after the pass
    js: list[tuple[tuple[int, int], np.ndarray]] = []
    images: dict[str, list[tuple[int, int]]] = {cam: [] for cam in config.cameras.values()}
    trajs: list[tuple[tuple[int, int], Any]] = []
    grips: list[tuple[tuple[int, int], float]] = []
    info: dict[str, Any] = {}
    instruction = ''
    arm_index = {n: i for i, n in enumerate(arm_joints)}
    n_arm = len(arm_joints)
    for m in bags.read_messages(bag, topics):
        if m.topic in config.cameras:
            try:
                stamp = _header_stamp_from_cdr(m.data)
            except (struct.error, IndexError) as err:
                raise bags.BagError(f'bag {bag}: a {m.topic} message logged at '
                                    f'{m.timestamp_ns} ns is too short for a header') from err
            images[config.cameras[m.topic]].append((stamp, m.timestamp_ns))
            continue
        msg = _decode(bag, m)
        if m.topic == config.joint_states_topic:
            pos = dict(zip(msg.name, np.asarray(msg.position, dtype=np.float64), strict=False))
            if not all(n in pos for n in arm_joints):
                continue
            width = sum(pos[n] for n in finger_joints) if all(
                n in pos for n in finger_joints) else np.nan
            js.append(((_stamp_ns(msg.header.stamp), m.timestamp_ns),
                       np.array([*(pos[n] for n in arm_joints), width])))
        elif m.topic == config.trajectory_topic:
            trajs.append(((_stamp_ns(msg.header.stamp), m.timestamp_ns), msg))
        elif m.topic == config.gripper_topic:
            grips.append(((_stamp_ns(msg.header.stamp), m.timestamp_ns), float(msg.width)))
        elif m.topic == config.instruction_topic:
            instruction = msg.data
        elif m.topic == bags.EPISODE_INFO_TOPIC:
            info = {k: getattr(msg, k) for k in ('episode_id', 'task', 'instruction', 'success',
                                                 'operator_name', 'robot', 'duration')}
    if not info:
        info = bags.read_episode_info(bag)
    if len(js) < 2:
        raise ConversionError(f'{bag}: fewer than 2 joint states on {config.joint_states_topic} '
                              f'naming {list(arm_joints)}')
    for cam, stamps in images.items():
        if not stamps:
            topic = next(t for t, c in config.cameras.items() if c == cam)
            raise ConversionError(f'{bag}: no images on {topic} (camera {cam})')
    # Messages without a stamp (a JointTrajectory stamped 0 means "now") take their receive
    # time, mapped onto the stamp clock through the joint states (receive time -> stamp,
    # interpolated): the recorder may run on wall time while the simulator stamps with a sim
    # clock that runs slower or faster than real time.
    to_stamp = receive_to_stamp_map([sr for sr, _ in js if sr[0]])
    when = lambda sr: sr[0] or to_stamp(sr[1])  # noqa: E731

    def when_command(sr: tuple[int, int]) -> int:
        # A command stamped on another clock (a node on wall time while the simulator runs on
        # sim time) is placed by its receive time instead.
        received = to_stamp(sr[1])
        if sr[0] and abs(sr[0] - received) <= config.max_clock_skew_s * 1e9:
            return sr[0]
        return received

    js = sorted(((when(sr), q) for sr, q in js), key=lambda x: x[0])
    images = {cam: [when(sr) for sr in v] for cam, v in images.items()}
    trajs = [(when_command(sr), msg) for sr, msg in trajs]
    grips = [(when_command(sr), w) for sr, w in grips]
    origin = js[0][0]
    to_s = lambda ns: (np.asarray(ns, dtype=np.int64) - origin) / 1e9  # noqa: E731
    js_q = np.stack([q for _, q in js])
    # Missing finger positions: carry the last known width (0 if never known).
    width = js_q[:, -1]
    if np.isnan(width).any():
        known = np.where(~np.isnan(width), np.arange(len(width)), 0)
        np.maximum.accumulate(known, out=known)
        width[:] = np.nan_to_num(width[known])
    trajectories = []
    for start_ns, msg in sorted(trajs, key=lambda x: x[0]):
        if not msg.points:
            continue
        cols = [arm_index.get(n) for n in msg.joint_names]
        pos = np.full((len(msg.points), n_arm), np.nan)
        vel = np.full((len(msg.points), n_arm), np.nan)
        has_vel = True
        for p_i, point in enumerate(msg.points):
            for j, col in enumerate(cols):
                if col is None:
                    continue
                pos[p_i, col] = point.positions[j]
                if len(point.velocities) == len(cols):
                    vel[p_i, col] = point.velocities[j]
                else:
                    has_vel = False
        times = np.array([p.time_from_start.sec + p.time_from_start.nanosec * 1e-9
                          for p in msg.points])
        trajectories.append(_Trajectory(float(to_s(start_ns)), times, pos,
                                        vel if has_vel else None))
    grips.sort(key=lambda x: x[0])
    return RecordedEpisode(
        bag=bag, info=info, js_t=to_s([t for t, _ in js]), js_q=js_q,
        image_t={cam: to_s(np.sort(s)) for cam, s in images.items()},
        image_log_index={cam: np.argsort(s, kind='stable') for cam, s in images.items()},
        trajectories=trajectories,
        gripper_t=to_s([t for t, _ in grips]),
        gripper_w=np.array([w for _, w in grips], dtype=np.float64),
        instruction=info.get('instruction') or instruction, t_origin_ns=origin)


def interpolate_state(rec: RecordedEpisode, t: np.ndarray) -> np.ndarray:
    """(F,) times -> (F, 8) interpolated states (clamped at the ends)."""
    return np.stack([np.interp(t, rec.js_t, rec.js_q[:, j])
                     for j in range(rec.js_q.shape[1])], axis=1)


def _hermite(t0: float, t1: float, p0: np.ndarray, p1: np.ndarray, v0: np.ndarray,
             v1: np.ndarray, t: float) -> np.ndarray:
    h = t1 - t0
    s = (t - t0) / h
    h00, h10 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s
    h01, h11 = -2 * s**3 + 3 * s**2, s**3 - s**2
    return h00 * p0 + h10 * h * v0 + h01 * p1 + h11 * h * v1


def commanded_arm(rec: RecordedEpisode, t: np.ndarray) -> np.ndarray:
    """(F,) times -> (F, n_arm) setpoints of the trajectory in force at each time."""
    state = interpolate_state(rec, t)[:, :-1]
    out = state.copy()
    starts = np.array([tr.start for tr in rec.trajectories])
    for f, tf in enumerate(t):
        k = int(np.searchsorted(starts, tf, side='right')) - 1
        if k < 0:
            continue       # no command yet: the controller holds the current position
        tr = rec.trajectories[k]
        q_start = interpolate_state(rec, np.array([tr.start]))[0, :-1]
        times = np.concatenate([[0.0], tr.times])
        pos = np.vstack([q_start, tr.positions])
        missing = np.isnan(pos)
        pos[missing] = np.broadcast_to(q_start, pos.shape)[missing]
        rel = tf - tr.start
        if rel >= times[-1]:
            out[f] = pos[-1]
            continue
        i = int(np.searchsorted(times, rel, side='right')) - 1
        if tr.velocities is not None and i > 0:
            v = np.nan_to_num(tr.velocities)
            out[f] = _hermite(times[i], times[i + 1], pos[i], pos[i + 1], v[i - 1], v[i], rel)
        else:
            w = (rel - times[i]) / max(times[i + 1] - times[i], 1e-9)
            out[f] = (1 - w) * pos[i] + w * pos[i + 1]
    return out


def commanded_gripper(rec: RecordedEpisode, t: np.ndarray) -> np.ndarray:
    """(F,) times -> (F,) last commanded width (measured width before the first command)."""
    measured = interpolate_state(rec, t)[:, -1]
    if len(rec.gripper_t) == 0:
        return measured
    k = np.searchsorted(rec.gripper_t, t, side='right') - 1
    return np.where(k >= 0, rec.gripper_w[np.maximum(k, 0)], measured)


def frame_times(rec: RecordedEpisode, fps: int) -> np.ndarray:
    """Regular grid over the span covered by joint states and every camera -> (F,) s."""
    start = max(rec.js_t[0], *(s[0] for s in rec.image_t.values()))
    stop = min(rec.js_t[-1], *(s[-1] for s in rec.image_t.values()))
    if stop < start:
        return np.zeros(0)
    return start + np.arange(int(np.floor((stop - start) * fps + 1e-6)) + 1) / fps


def action_source_of(rec: RecordedEpisode, config: ConvertConfig) -> str:
    if config.action_source != 'auto':
        return config.action_source
    return 'command' if rec.trajectories else 'next_state'


def align(rec: RecordedEpisode, config: ConvertConfig) -> dict[str, Any]:
    """Frame times, states, actions and the chosen image index per camera."""
    t = frame_times(rec, config.fps)
    if len(t) < config.min_frames:
        raise ConversionError(f'{rec.bag}: only {len(t)} frame(s) where joint states and all '
                              'cameras overlap')
    lead_t = t + config.action_lead_frames / config.fps
    source = action_source_of(rec, config)
    if source == 'command':
        if not rec.trajectories:
            raise ConversionError(f'{rec.bag}: action_source=command but no JointTrajectory on '
                                  f'{config.trajectory_topic}')
        action = np.concatenate([commanded_arm(rec, lead_t),
                                 commanded_gripper(rec, lead_t)[:, None]], axis=1)
    else:
        action = interpolate_state(rec, np.minimum(lead_t, rec.js_t[-1]))
    chosen = {}
    for cam, stamps in rec.image_t.items():
        # The policy node's rule (observation_sync): the image nearest to the frame's time,
        # within the limit (0: SKEW_FRACTION of this camera's period).
        nearest = nearest_index(stamps, t)
        limit = skew_limit(frame_period(stamps), config.max_image_age_s)
        age = np.abs(stamps[nearest] - t)
        if age.max() > limit:
            f = int(age.argmax())
            raise ConversionError(f'{rec.bag}: camera {cam} has no image within '
                                  f'{limit:.3f} s of frame {f} (gap {age[f]:.3f} s;'
                                  ' --max-image-age accepts it, --skip-bad skips the episode)')
        chosen[cam] = nearest
    return {'t': t, 'state': interpolate_state(rec, t).astype(np.float32),
            'action': action.astype(np.float32), 'images': chosen, 'source': source}


def _load_images(rec: RecordedEpisode, config: ConvertConfig,
                 chosen: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Second pass over the bag: decode only the images that frames use."""
    wanted = {cam: {int(rec.image_log_index[cam][k]) for k in idx}
              for cam, idx in chosen.items()}
    counters = dict.fromkeys(chosen, 0)
    by_log: dict[str, dict[int, np.ndarray]] = {cam: {} for cam in chosen}
    for m in bags.read_messages(rec.bag, set(config.cameras)):
        cam = config.cameras[m.topic]
        i = counters[cam]
        counters[cam] += 1
        if i in wanted[cam]:
            try:
                by_log[cam][i] = image_to_rgb(_decode(rec.bag, m))
            except ValueError as err:    # sizes that do not match its data, an encoding
                raise ConversionError(f'{rec.bag}: {m.topic} image logged at {m.timestamp_ns} '
                                      f'ns: {err}') from err
    decoded = {cam: {int(k): by_log[cam][int(rec.image_log_index[cam][k])] for k in idx}
               for cam, idx in chosen.items()}
    out = {}
    for cam, idx in chosen.items():
        frames = np.stack([decoded[cam][int(k)] for k in idx])
        out[cam] = resize_images(frames, config.image_size)
    shapes = {cam: f.shape[1:3] for cam, f in out.items()}
    for cam, frames in out.items():
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            raise ConversionError(f'{rec.bag}: camera {cam} frames are {shapes[cam]}; video '
                                  'needs even sizes (use image_size / --image-size)')
    return out


def bag_to_episode(bag: Path, config: ConvertConfig) -> tuple[EpisodeData, str]:
    """One bag -> (aligned episode, action source used); raises ConversionError/BagError."""
    from iflybot_vla_policy.robot import load_robot

    robot = load_robot()
    rec = read_episode(bag, config, robot.arm_joint_names, robot.finger_joint_names)
    aligned = align(rec, config)
    images = _load_images(rec, config, aligned['images'])
    info = rec.info
    return EpisodeData(
        state=aligned['state'], action=aligned['action'], images=images,
        instruction=rec.instruction or info.get('task', '') or 'do the task',
        task_name=info.get('task', ''), success=bool(info.get('success', False)),
        episode_id=info.get('episode_id', '') or bag.name,
        operator_name=info.get('operator_name', ''),
        robot=info.get('robot', '') or robot.name), aligned['source']


def expand_bag_paths(paths: Iterable[Path | str]) -> list[Path]:
    """Bag directories from arguments that are bags or directories of bags (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / 'metadata.yaml').is_file() or any(p.glob('*.mcap')):
            out.append(p)
        elif p.is_dir():
            subs = sorted(d for d in p.iterdir() if d.is_dir() and (
                (d / 'metadata.yaml').is_file() or any(d.glob('*.mcap'))))
            if not subs:
                raise bags.BagError(f'{p} is neither a bag nor a directory of bags')
            out.extend(subs)
        else:
            raise bags.BagError(f'bag {p} does not exist')
    return out


@dataclass
class ConvertReport:
    written: list[str] = field(default_factory=list)             # episode ids
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (bag, reason)
    frames: int = 0
    sources: dict[str, int] = field(default_factory=dict)          # action source -> episodes


def bags_to_dataset(bag_paths: Sequence[Path | str], out: Path | str,
                    config: ConvertConfig = ConvertConfig(), overwrite: bool = False,
                    skip_bad: bool = False, progress: bool = True,
                    on_episode: Callable[[EpisodeData], None] | None = None) -> ConvertReport:
    """Convert bags to one LeRobot dataset at `out`; bad bags abort unless `skip_bad`."""
    from tqdm import tqdm

    from iflybot_vla_policy.data.lerobot_writer import LeRobotWriter, WriterConfig

    paths = expand_bag_paths(bag_paths)
    report = ConvertReport()
    writer = LeRobotWriter(out, WriterConfig(fps=config.fps), overwrite=overwrite)
    try:
        for bag in tqdm(paths, desc='bag2dataset', unit='bag', disable=not progress):
            try:
                if config.success_only and not bags.read_episode_info(bag).get('success'):
                    report.skipped.append((str(bag), 'not successful'))
                    continue
                ep, source = bag_to_episode(bag, config)
            except (bags.BagError, ConversionError) as err:
                if not skip_bad:
                    raise
                report.skipped.append((str(bag), str(err)))
                continue
            writer.add_episode(ep)
            if on_episode is not None:
                on_episode(ep)
            report.written.append(ep.episode_id)
            report.frames += ep.length
            report.sources[source] = report.sources.get(source, 0) + 1
        if not report.written:
            raise ConversionError('no episode was converted: ' + '; '.join(
                f'{b}: {r}' for b, r in report.skipped))
        writer.close()
    except BaseException:
        writer.__exit__(RuntimeError, None, None)
        raise
    return report

