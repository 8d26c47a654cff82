"""A MoveIt-Servo-like Cartesian velocity follower (TwistStamped in, joint commands out).

Each control step: scale the twist to the Cartesian limits, map it to joint velocities with
damped least squares on the TCP Jacobian, scale to the joint velocity limits, limit the change
by the joint acceleration limits, stop joints that would leave their limits, integrate. A twist
older than `timeout` counts as zero (Servo's incoming_command_timeout), so the arm stops if the
sender dies.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ServoConfig:
    max_linear_velocity: float      # m/s
    max_angular_velocity: float     # rad/s
    dq_max: np.ndarray              # (n,) rad/s
    ddq_max: np.ndarray             # (n,) rad/s^2
    q_min: np.ndarray               # (n,)
    q_max: np.ndarray               # (n,)
    timeout: float = 0.2            # s without a new twist -> decelerate to rest
    damping: float = 1e-3           # DLS damping (m^2); larger = slower near singularities
    limit_margin: float = 0.02      # rad kept from the joint limits


class CartesianServo:
    """Integrates a commanded TCP twist into a desired joint state (positions, velocities)."""

    def __init__(self, config: ServoConfig, jacobian: Callable[[np.ndarray], np.ndarray]) -> None:
        self.config = config
        self._jacobian = jacobian        # q (n,) -> (6, n)
        n = len(config.dq_max)
        self.q = np.zeros(n)
        self.dq = np.zeros(n)
        self._twist = np.zeros(6)        # (6,) linear, angular in the base frame
        self._stamp = -np.inf

    def reset(self, q: np.ndarray, dq: np.ndarray | None = None) -> None:
        self.q = np.asarray(q, np.float64).copy()
        self.dq = np.zeros_like(self.q) if dq is None else np.asarray(dq, np.float64).copy()

    def command(self, linear: np.ndarray, angular: np.ndarray, now: float) -> None:
        twist = np.concatenate([np.asarray(linear, np.float64), np.asarray(angular, np.float64)])
        if twist.shape != (6,) or not np.all(np.isfinite(twist)):
            raise ValueError(f'twist must be 3 + 3 finite numbers, got {twist}')
        self._twist, self._stamp = twist, now

    @property
    def moving(self) -> bool:
        return bool(np.any(np.abs(self.dq) > 1e-6))

    def active(self, now: float) -> bool:
        """A fresh command is present or the arm is still decelerating."""
        return now - self._stamp <= self.config.timeout or self.moving

    def update(self, dt: float, now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance by dt; returns desired positions, velocities, accelerations, each (n,)."""
        cfg = self.config
        twist = self._twist if now - self._stamp <= cfg.timeout else np.zeros(6)
        lin, ang = twist[:3].copy(), twist[3:].copy()
        lin_norm, ang_norm = np.linalg.norm(lin), np.linalg.norm(ang)
        if lin_norm > cfg.max_linear_velocity:
            lin *= cfg.max_linear_velocity / lin_norm
        if ang_norm > cfg.max_angular_velocity:
            ang *= cfg.max_angular_velocity / ang_norm
        target = np.zeros_like(self.q)
        if lin_norm > 0.0 or ang_norm > 0.0:
            jac = self._jacobian(self.q)
            target = jac.T @ np.linalg.solve(jac @ jac.T + cfg.damping * np.eye(6),
                                             np.concatenate([lin, ang]))
            ratio = np.max(np.abs(target) / cfg.dq_max)
            if ratio > 1.0:
                target /= ratio
        step = np.clip(target - self.dq, -cfg.ddq_max * dt, cfg.ddq_max * dt)
        dq = self.dq + step
        q = self.q + dq * dt
        low, high = cfg.q_min + cfg.limit_margin, cfg.q_max - cfg.limit_margin
        blocked = ((q < low) & (dq < 0)) | ((q > high) & (dq > 0))
        dq[blocked] = 0.0
        q = np.where(blocked, np.clip(self.q, low, high), q)
        ddq = (dq - self.dq) / dt
        self.q, self.dq = q, dq
        return q.copy(), dq.copy(), ddq
