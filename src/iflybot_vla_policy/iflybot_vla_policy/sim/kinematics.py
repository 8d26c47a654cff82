"""TCP kinematics on the MuJoCo model: pose, Jacobian, damped-least-squares IK.

Uses a private MjData so that IK and Servo never disturb the simulation state.
"""
from __future__ import annotations

import math

import mujoco
import numpy as np


def rotvec_from_matrix(rot: np.ndarray) -> np.ndarray:
    """Rotation vector (axis * angle, (3,)) of a rotation matrix (3, 3); robust near pi."""
    cos = min(1.0, max(-1.0, (np.trace(rot) - 1.0) / 2.0))
    angle = math.acos(cos)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    if angle < 1e-7:
        return axis / 2.0
    if angle > math.pi - 1e-4:
        # Near pi the antisymmetric part vanishes: take the axis from the symmetric part.
        k = int(np.argmax(np.diag(rot)))
        col = (rot[:, k] + np.eye(3)[k]) / math.sqrt(max(2.0 * (1.0 + rot[k, k]), 1e-12))
        sign = 1.0 if np.dot(col, axis) >= 0.0 else -1.0
        return sign * col / np.linalg.norm(col) * angle
    return axis / (2.0 * math.sin(angle)) * angle


def matrix_from_rotvec(vec: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(vec))
    if angle < 1e-12:
        return np.eye(3)
    k = np.asarray(vec, np.float64) / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class ArmKinematics:
    """TCP site kinematics of the arm joints (first `n` hinge joints of the model)."""

    def __init__(self, model: mujoco.MjModel, joint_names: tuple[str, ...],
                 q_min: np.ndarray, q_max: np.ndarray, site: str = 'tcp') -> None:
        self.model = model
        self.data = mujoco.MjData(model)
        self.qpos_adr = np.array([model.joint(n).qposadr[0] for n in joint_names])
        self.dof_adr = np.array([model.joint(n).dofadr[0] for n in joint_names])
        self.site_id = model.site(site).id
        self.q_min, self.q_max = np.asarray(q_min), np.asarray(q_max)
        self._jacp = np.zeros((3, model.nv))
        self._jacr = np.zeros((3, model.nv))

    def _set(self, q: np.ndarray) -> None:
        self.data.qpos[self.qpos_adr] = q
        mujoco.mj_kinematics(self.model, self.data)

    def tcp_pose(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """q (n,) -> TCP position (3,) and rotation matrix (3, 3) in the base frame."""
        self._set(q)
        return (self.data.site_xpos[self.site_id].copy(),
                self.data.site_xmat[self.site_id].reshape(3, 3).copy())

    def jacobian(self, q: np.ndarray) -> np.ndarray:
        """(6, n): TCP linear (m/s) over angular (rad/s) velocity per joint velocity (base)."""
        self._set(q)
        mujoco.mj_comPos(self.model, self.data)
        mujoco.mj_jacSite(self.model, self.data, self._jacp, self._jacr, self.site_id)
        return np.vstack([self._jacp[:, self.dof_adr], self._jacr[:, self.dof_adr]])

    def solve_ik(self, pos: np.ndarray, rot: np.ndarray, q_seed: np.ndarray,
                 q_nominal: np.ndarray | None = None, iterations: int = 60,
                 tol: float = 1e-4, damping: float = 1e-3,
                 nullspace_gain: float = 0.05) -> tuple[np.ndarray, float]:
        """Damped least squares IK from q_seed; returns q (n,) and the final pose error norm.

        The error mixes metres and radians (one rad counts as 0.1 m); a small null-space pull
        towards q_nominal keeps the redundant elbow near a comfortable posture.
        """
        q = np.asarray(q_seed, np.float64).copy()
        weight = np.array([1.0, 1.0, 1.0, 0.1, 0.1, 0.1])
        err_norm = math.inf
        for _ in range(iterations):
            jac = self.jacobian(q)          # also sets kinematics at q
            cur_p = self.data.site_xpos[self.site_id]
            cur_r = self.data.site_xmat[self.site_id].reshape(3, 3)
            err = np.concatenate([pos - cur_p, rotvec_from_matrix(rot @ cur_r.T)])
            err_norm = float(np.linalg.norm(err * weight))
            if err_norm < tol:
                break
            jw = jac * weight[:, None]
            jjt = jw @ jw.T + damping * np.eye(6)
            dq = jw.T @ np.linalg.solve(jjt, err * weight)
            if q_nominal is not None:
                null = np.eye(len(q)) - np.linalg.pinv(jw) @ jw
                dq += null @ (nullspace_gain * (q_nominal - q))
            step = np.max(np.abs(dq))
            if step > 0.3:
                dq *= 0.3 / step
            q = np.clip(q + dq, self.q_min + 1e-4, self.q_max - 1e-4)
        return q, err_norm
