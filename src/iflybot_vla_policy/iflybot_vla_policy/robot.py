"""The robot description the core uses: joint names, limits and kinematics, loaded from YAML."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from iflybot_vla_policy.paths import config_dir


@dataclass(frozen=True)
class GripperSpec:
    max_width: float
    max_speed: float
    max_force: float


@dataclass(frozen=True)
class PositionVelocityLimits:
    """Franka's position-based joint velocity limits (config/robot/fr3.yaml); arrays (n,)."""

    offset: np.ndarray       # rad/s
    k: np.ndarray            # rad/s^2
    upper: np.ndarray        # rad
    lower: np.ndarray        # rad

    def bounds(self, q: np.ndarray, dq_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) velocity limits (n,) at joint positions q (n,)."""
        up = np.sqrt(np.maximum(0.0, self.k * (self.upper - q))) - self.offset
        down = self.offset - np.sqrt(np.maximum(0.0, self.k * (q - self.lower)))
        return (np.maximum(-dq_max, np.minimum(0.0, down)),
                np.minimum(dq_max, np.maximum(0.0, up)))


@dataclass(frozen=True)
class RobotSpec:
    """Kinematics and limits of one arm; arrays have one entry per arm joint (7 for the FR3)."""

    name: str
    arm_joint_names: tuple[str, ...]
    finger_joint_names: tuple[str, ...]
    dh: np.ndarray           # (n_joints, 3): a_{i-1}, d_i, alpha_{i-1} (modified DH)
    flange_d: float
    hand_yaw: float
    tcp_offset: float
    q_min: np.ndarray        # (n_joints,)
    q_max: np.ndarray
    dq_max: np.ndarray
    ddq_max: np.ndarray
    tau_max: np.ndarray
    home: np.ndarray
    gripper: GripperSpec
    max_linear_velocity: float
    max_angular_velocity: float
    workspace_min: np.ndarray  # (3,)
    workspace_max: np.ndarray  # (3,)
    dddq_max: np.ndarray | None = None        # (n_joints,) rad/s^3; None: no jerk check
    velocity_limits_by_position: PositionVelocityLimits | None = None

    @property
    def n_joints(self) -> int:
        return len(self.arm_joint_names)

    def forward_kinematics(self, q: np.ndarray) -> np.ndarray:
        """TCP pose(s) as 4x4 homogeneous transforms in the base frame.

        q: (..., n_joints) -> (..., 4, 4)
        """
        q = np.asarray(q, dtype=np.float64)
        batch = q.shape[:-1]
        pose = np.broadcast_to(np.eye(4), (*batch, 4, 4)).copy()
        for i, (a, d, alpha) in enumerate(self.dh):
            pose = pose @ _mdh(a, d, alpha, q[..., i])
        pose = pose @ _mdh(0.0, self.flange_d, 0.0, np.full(batch, self.hand_yaw))
        tcp = np.eye(4)
        tcp[2, 3] = self.tcp_offset
        return pose @ tcp

    def tcp_position(self, q: np.ndarray) -> np.ndarray:
        """q: (..., n_joints) -> (..., 3) TCP position in m."""
        return self.forward_kinematics(q)[..., :3, 3]


def _mdh(a: float, d: float, alpha: float, theta: np.ndarray) -> np.ndarray:
    """Modified-DH link transform; theta: (...,) -> (..., 4, 4)."""
    theta = np.asarray(theta, dtype=np.float64)
    ct, st = np.cos(theta), np.sin(theta)
    ca, sa = math.cos(alpha), math.sin(alpha)
    out = np.zeros((*theta.shape, 4, 4))
    out[..., 0, 0], out[..., 0, 1], out[..., 0, 3] = ct, -st, a
    out[..., 1, 0], out[..., 1, 1], out[..., 1, 2], out[..., 1, 3] = st * ca, ct * ca, -sa, -sa * d
    out[..., 2, 0], out[..., 2, 1], out[..., 2, 2], out[..., 2, 3] = st * sa, ct * sa, ca, ca * d
    out[..., 3, 3] = 1.0
    return out


_REQUIRED = ('name', 'arm_joint_names', 'finger_joint_names', 'dh', 'flange_d', 'hand_yaw',
             'tcp_offset', 'q_min', 'q_max', 'dq_max', 'ddq_max', 'tau_max', 'home', 'gripper',
             'cartesian', 'workspace')
_OPTIONAL = ('dddq_max', 'velocity_limits_by_position')


def load_robot(name_or_path: str | Path = 'fr3') -> RobotSpec:
    """Load `config/robot/<name>.yaml` (or a path); errors name the file and the bad key."""
    path = Path(name_or_path)
    if not path.suffix:
        path = config_dir() / 'robot' / f'{name_or_path}.yaml'
    if not path.is_file():
        raise FileNotFoundError(f'robot description not found: {path}')
    data = yaml.safe_load(path.read_text())
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(f'{path}: missing key(s) {missing}')
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f'{path}: unknown key(s) {unknown}; valid keys: '
                         f'{list(_REQUIRED + _OPTIONAL)}')
    n = len(data['arm_joint_names'])
    arrays = {}
    for key in ('q_min', 'q_max', 'dq_max', 'ddq_max', 'tau_max', 'home', 'dddq_max'):
        if key not in data:
            continue
        arr = np.asarray(data[key], dtype=np.float64)
        if arr.shape != (n,):
            raise ValueError(f'{path}: {key} must have {n} entries, got {arr.shape}')
        arrays[key] = arr
    pbv = None
    if 'velocity_limits_by_position' in data:
        fields = {}
        for key in ('offset', 'k', 'upper', 'lower'):
            arr = np.asarray(data['velocity_limits_by_position'].get(key), dtype=np.float64)
            if arr.shape != (n,):
                raise ValueError(f'{path}: velocity_limits_by_position.{key} must have {n} '
                                 f'entries, got {arr.shape}')
            fields[key] = arr
        pbv = PositionVelocityLimits(**fields)
    dh = np.asarray(data['dh'], dtype=np.float64)
    if dh.shape != (n, 3):
        raise ValueError(f'{path}: dh must be {n} rows of [a, d, alpha], got {dh.shape}')
    if np.any(arrays['q_min'] >= arrays['q_max']):
        raise ValueError(f'{path}: q_min must be below q_max for every joint')
    grip, cart, ws = data['gripper'], data['cartesian'], data['workspace']
    return RobotSpec(
        name=str(data['name']),
        arm_joint_names=tuple(data['arm_joint_names']),
        finger_joint_names=tuple(data['finger_joint_names']),
        dh=dh, flange_d=float(data['flange_d']), hand_yaw=float(data['hand_yaw']),
        tcp_offset=float(data['tcp_offset']),
        gripper=GripperSpec(float(grip['max_width']), float(grip['max_speed']),
                            float(grip['max_force'])),
        max_linear_velocity=float(cart['max_linear_velocity']),
        max_angular_velocity=float(cart['max_angular_velocity']),
        workspace_min=np.asarray(ws['min'], dtype=np.float64),
        workspace_max=np.asarray(ws['max'], dtype=np.float64),
        velocity_limits_by_position=pbv, **arrays)
