"""Scripted experts: waypoint plans per task, turned into the commands a policy emits.

An expert reads the task's ground truth (object poses) and walks a list of phases (pre-grasp,
descend, close, lift, move, lower, release, retreat; push and drawer have their own). Between
phases the TCP follows a straight line with a trapezoidal speed profile and a top-down
orientation (yaw only); every planned TCP pose goes through damped-least-squares IK on the
MuJoCo model. Outputs, all per the shared action convention:

- `next_chunk(obs)` -> float32 (horizon, 8): absolute joint targets + gripper width (joint mode);
- `next_chunk(obs, mode='ee_delta')` -> float32 (horizon, 7): TCP position and rotation-vector
  deltas per step in the base frame + gripper width;
- `next_twist(obs)` -> (linear (3,), angular (3,), gripper width): a Servo command for now.

`run_expert_episode(env, max_time)` runs one episode with joint chunks (or twists) and returns
whether the task succeeded.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from iflybot_vla_policy.sim.env import SimEnv
from iflybot_vla_policy.sim.kinematics import (
    matrix_from_rotvec,
    rot_z,
    rotvec_from_matrix,
)
from iflybot_vla_policy.sim.tasks import (
    CUBE_HALF,
    PUCK_RADIUS,
    Drawer,
    PickPlace,
    Push,
    Stack,
    _quat_yaw,
)

R_DOWN = np.diag([1.0, -1.0, -1.0])   # TCP orientation at home: z down, fingers along -y
OPEN = 0.08
CLOSED = 0.0
SAFE_Z = 0.16            # m, transit height of the TCP
ACCEL = 0.6              # m/s^2 along a straight segment
MAX_ROT_SPEED = 1.5      # rad/s
PAD_HALF = 0.01          # finger pad half thickness along the TCP x axis (push face)

Target = Callable[[], tuple[np.ndarray, float]]   # -> TCP position (3,), yaw (rad)


@dataclass
class Phase:
    """Go to target (evaluated on entry, or at each chunk when `replan`) and wait there."""

    name: str
    target: Target
    grip: float
    speed: float
    wait: float = 0.0
    replan: bool = False
    # Checked at each chunk start: a phase name to jump to (e.g. re-approach), or None.
    check: Callable[[], str | None] | None = None


def tcp_rotation(yaw: float) -> np.ndarray:
    """Top-down TCP orientation turned by yaw about the vertical."""
    return rot_z(yaw) @ R_DOWN


def _closest_equivalent(angle: float, reference: float, period: float) -> float:
    return angle + period * round((reference - angle) / period)


class ScriptedExpert:
    """Waypoint expert for one env; call `reset()` after `env.reset()`."""

    def __init__(self, env: SimEnv, horizon: int = 10, dt: float = 0.05,
                 speed: float = 0.25) -> None:
        if horizon < 1 or dt <= 0:
            raise ValueError(f'horizon must be >= 1 and dt > 0, got {horizon}, {dt}')
        self.env = env
        self.horizon = horizon
        self.dt = dt
        self.speed = speed
        self.reset()

    # ----------------------------------------------------------------------------- plan
    def reset(self) -> None:
        env = self.env
        self.q = env.joint_positions[:7].copy()
        pos, rot = env.tcp_pose()
        self.pos, self.rot = pos, rot
        self.yaw = math.atan2(rot[1, 0], rot[0, 0])
        self.grip = OPEN
        self.v = 0.0
        self.phases = self._build_phases()
        self._twist_steps = 0
        self.index = 0
        self._enter(0)

    @property
    def done(self) -> bool:
        return self.phases[self.index].name == 'done'

    def _enter(self, index: int) -> None:
        self.index = index
        self.timer = 0.0
        self.target_pos, self.target_yaw = self.phases[index].target()
        self.target_yaw = _closest_equivalent(self.target_yaw, self.yaw, 2 * math.pi)

    def _jump(self, name: str) -> None:
        names = [p.name for p in self.phases]
        self._enter(names.index(name))

    def _obj(self, name: str) -> tuple[np.ndarray, float]:
        adr = self.env.model.joint(name).qposadr[0]
        qpos = self.env.data.qpos[adr:adr + 7]
        return qpos[:3].copy(), _quat_yaw(qpos[3:])

    def _grasp_yaw(self, name: str) -> float:
        return _closest_equivalent(self._obj(name)[1], 0.0, math.pi / 2)

    def _here(self, z: float | None = None) -> Target:
        def target() -> tuple[np.ndarray, float]:
            pos = self.pos.copy()
            if z is not None:
                pos[2] = z
            return pos, self.yaw
        return target

    def _build_phases(self) -> list[Phase]:
        task = self.env.task
        if isinstance(task, (PickPlace, Stack)):
            return self._pick_and_place_phases(task)
        if isinstance(task, Push):
            return self._push_phases(task)
        if isinstance(task, Drawer):
            return self._drawer_phases(task)
        raise ValueError(f'no scripted expert for task {task.name!r}')

    def _pick_and_place_phases(self, task: PickPlace | Stack) -> list[Phase]:
        obj = str(task.state.plan['object'])
        v = self.speed

        def above_object() -> tuple[np.ndarray, float]:
            p, _ = self._obj(obj)
            return np.array([p[0], p[1], SAFE_Z]), self._grasp_yaw(obj)

        def at_object() -> tuple[np.ndarray, float]:
            p, _ = self._obj(obj)
            return np.array([p[0], p[1], max(p[2], 0.015)]), self.target_yaw

        def place_xy() -> np.ndarray:
            if isinstance(task, PickPlace):
                return self.env.data.xpos[self.env.model.body('bowl').id][:2].copy()
            return self._obj(str(task.state.plan['base']))[0][:2]

        def place_height() -> float:
            if isinstance(task, PickPlace):
                return 0.008 + CUBE_HALF + 0.012
            return self._obj(str(task.state.plan['base']))[0][2] + 2 * CUBE_HALF + 0.008

        def above_place() -> tuple[np.ndarray, float]:
            xy = place_xy()
            return np.array([xy[0], xy[1], SAFE_Z]), self.yaw

        def at_place() -> tuple[np.ndarray, float]:
            xy = place_xy()
            return np.array([xy[0], xy[1], place_height()]), self.yaw

        return [
            Phase('pregrasp', above_object, OPEN, v),
            Phase('descend', at_object, OPEN, 0.12, wait=0.1),
            Phase('close', self._here(), CLOSED, v, wait=0.6),
            Phase('lift', self._here(SAFE_Z), CLOSED, 0.15),
            Phase('carry', above_place, CLOSED, v),
            Phase('lower', at_place, CLOSED, 0.1, wait=0.1),
            Phase('release', self._here(), OPEN, v, wait=0.5),
            Phase('retreat', self._here(SAFE_Z), OPEN, 0.15),
            Phase('done', self._here(), OPEN, v),
        ]

    def _push_phases(self, task: Push) -> list[Phase]:
        v = self.speed
        standoff = PUCK_RADIUS + PAD_HALF

        def direction() -> np.ndarray:
            d = task.goal_xy(self.env) - self._obj('puck')[0][:2]
            return d / max(np.linalg.norm(d), 1e-9)

        def push_yaw() -> float:
            d = direction()
            return _closest_equivalent(math.atan2(d[1], d[0]), 0.0, math.pi)

        def behind(z: float, extra: float) -> Target:
            def target() -> tuple[np.ndarray, float]:
                p = self._obj('puck')[0][:2] - direction() * (standoff + extra)
                return np.array([p[0], p[1], z]), push_yaw()
            return target

        def push_target() -> tuple[np.ndarray, float]:
            d = direction()
            p = task.goal_xy(self.env) - d * (standoff - 0.01)
            return np.array([p[0], p[1], 0.02]), self.yaw

        def push_check() -> str | None:
            puck = self._obj('puck')[0][:2]
            if np.linalg.norm(puck - task.goal_xy(self.env)) < 0.015:
                return 'retreat'
            d = direction()
            rel = self.env.tcp_pose()[0][:2] - puck
            lateral = abs(rel[0] * d[1] - rel[1] * d[0])
            if lateral > 0.012 or np.dot(rel, d) > -standoff + 0.015:
                return 'lift'     # lost the puck: go around and approach again
            return None

        def approach_check() -> str | None:
            puck = self._obj('puck')[0][:2]
            if np.linalg.norm(puck - task.goal_xy(self.env)) < 0.015:
                return 'retreat'
            return None

        return [
            Phase('lift', self._here(0.1), CLOSED, 0.15),
            Phase('prepush', behind(0.1, 0.03), CLOSED, v, check=approach_check),
            Phase('descend', behind(0.02, 0.03), CLOSED, 0.12, replan=True),
            Phase('push', push_target, CLOSED, 0.06, replan=True, check=push_check),
            Phase('retreat', self._here(SAFE_Z), CLOSED, 0.15),
            Phase('done', self._here(), CLOSED, v),
        ]

    def _drawer_phases(self, task: Drawer) -> list[Phase]:
        v = self.speed
        name = str(task.state.plan['drawer'])
        yaw = float(task.state.plan['yaw'])
        pull = np.array([-math.cos(yaw), -math.sin(yaw), 0.0])

        def handle() -> np.ndarray:
            return self.env.data.site_xpos[self.env.model.site(f'{name}_handle').id].copy()

        def grasp_yaw() -> float:
            return _closest_equivalent(yaw, 0.0, math.pi)

        def above_handle() -> tuple[np.ndarray, float]:
            return handle() + [0.0, 0.0, 0.1], grasp_yaw()

        def at_handle() -> tuple[np.ndarray, float]:
            return handle(), self.yaw

        def pulled() -> tuple[np.ndarray, float]:
            return self.pos + pull * 0.16, self.yaw

        return [
            Phase('pregrasp', above_handle, OPEN, v),
            Phase('descend', at_handle, OPEN, 0.12, wait=0.1),
            Phase('close', self._here(), CLOSED, v, wait=0.6),
            Phase('pull', pulled, CLOSED, 0.08, wait=0.1),
            Phase('release', self._here(), OPEN, v, wait=0.5),
            Phase('retreat', self._here(SAFE_Z), OPEN, 0.15),
            Phase('done', self._here(), OPEN, v),
        ]

    # ----------------------------------------------------------------------------- stepping
    def _resync(self) -> None:
        """Follow the measured TCP if it was pushed far off the plan (e.g. by a contact)."""
        pos, rot = self.env.tcp_pose()
        if np.linalg.norm(pos - self.pos) > 0.03:
            self.pos, self.rot = pos, rot
            self.q = self.env.joint_positions[:7].copy()
            self.v = 0.0

    def _chunk_start(self) -> None:
        self._resync()
        phase = self.phases[self.index]
        if phase.check is not None:
            jump = phase.check()
            if jump is not None:
                self._jump(jump)
                return
        if phase.replan:
            self.target_pos, yaw = phase.target()
            self.target_yaw = _closest_equivalent(yaw, self.yaw, 2 * math.pi)

    def _advance(self, dt: float) -> None:
        """Move the planned pose one step towards the phase target; switch phases when done."""
        phase = self.phases[self.index]
        delta = self.target_pos - self.pos
        dist = float(np.linalg.norm(delta))
        self.v = min(phase.speed, self.v + ACCEL * dt, math.sqrt(2 * ACCEL * dist))
        step = min(dist, self.v * dt)
        if dist > 1e-9:
            self.pos = self.pos + delta / dist * step
        target_rot = tcp_rotation(self.target_yaw)
        err = rotvec_from_matrix(target_rot @ self.rot.T)
        angle = float(np.linalg.norm(err))
        max_angle = MAX_ROT_SPEED * dt
        if angle > max_angle:
            err *= max_angle / angle
        self.rot = matrix_from_rotvec(err) @ self.rot
        self.yaw = math.atan2(self.rot[1, 0], self.rot[0, 0])
        self.grip = phase.grip
        if dist - step < 1e-5 and angle <= max_angle:
            self.timer += dt
            if self.timer >= phase.wait - 1e-9 and phase.name != 'done':
                self.v = 0.0
                self._enter(self.index + 1)

    def _ik(self) -> np.ndarray:
        robot = self.env.robot
        q, _ = self.env.kinematics.solve_ik(self.pos, self.rot, self.q, q_nominal=robot.home,
                                            iterations=30)
        self.q = q
        return q

    def next_chunk(self, obs: dict | None = None, mode: str = 'joint') -> np.ndarray:
        """The next `horizon` actions at `dt` spacing (see module docstring for the modes)."""
        if mode not in ('joint', 'ee_delta'):
            raise ValueError(f"mode must be 'joint' or 'ee_delta', got {mode!r}")
        self._chunk_start()
        width = 8 if mode == 'joint' else 7
        out = np.zeros((self.horizon, width), dtype=np.float32)
        for k in range(self.horizon):
            prev_pos, prev_rot = self.pos.copy(), self.rot.copy()
            self._advance(self.dt)
            if mode == 'joint':
                out[k, :7] = self._ik()
            else:
                out[k, :3] = self.pos - prev_pos
                out[k, 3:6] = rotvec_from_matrix(self.rot @ prev_rot.T)
            out[k, -1] = self.grip
        return out

    def next_twist(self, obs: dict | None = None,
                   gain: float = 2.0) -> tuple[np.ndarray, np.ndarray, float]:
        """A Servo command for the next `dt`: feed-forward plan velocity plus a pull towards the
        plan from the measured TCP. Returns linear (3,) m/s, angular (3,) rad/s, gripper width.
        """
        # Re-plan (checks, moving targets) as often as a chunk would: every `horizon` steps.
        if self._twist_steps % self.horizon == 0:
            self._chunk_start()
        self._twist_steps += 1
        prev_pos, prev_rot = self.pos.copy(), self.rot.copy()
        index = self.index
        self._advance(self.dt)
        if self.index != index:
            self._chunk_start()
        pos, rot = self.env.tcp_pose()
        linear = (self.pos - prev_pos) / self.dt + gain * (self.pos - pos)
        angular = (rotvec_from_matrix(self.rot @ prev_rot.T) / self.dt
                   + gain * rotvec_from_matrix(self.rot @ rot.T))
        return linear, angular, self.grip


def offset_start(env: SimEnv, rng: np.random.Generator, radius: tuple[float, float],
                 height: tuple[float, float] = (0.08, SAFE_Z + 0.04),
                 yaw_spread: float = 0.4) -> np.ndarray:
    """Put the arm, hand open, at rest above the object to pick but `radius` m off its centre.

    A demo that starts there shows what the expert's own demos never do: an approach that
    missed the object, seen by the wrist camera, and corrected. A policy that localises the
    object to ~2 cm from the scene camera needs exactly that to grasp (DART, Laskey et al. 2017,
    injects such off-path states by noise). Offset direction uniform, distance uniform in
    `radius`, TCP height uniform in `height`, yaw off the grasp yaw by up to `yaw_spread`.
    Returns the TCP position (3,) it placed the arm at.
    """
    task = env.task
    if not isinstance(task, (PickPlace, Stack)):
        raise ValueError(f'offset starts need a pick task (pick_place, stack), not {task.name!r}')
    lo, hi = radius
    if not 0.0 <= lo <= hi:
        raise ValueError(f'offset radius must satisfy 0 <= min <= max, got {radius}')
    expert = ScriptedExpert(env)
    obj = str(task.state.plan['object'])
    centre, _ = expert._obj(obj)
    angle, dist = rng.uniform(-math.pi, math.pi), rng.uniform(lo, hi)
    pos = np.array([centre[0] + dist * math.cos(angle), centre[1] + dist * math.sin(angle),
                    rng.uniform(*height)])
    rot = tcp_rotation(expert._grasp_yaw(obj) + rng.uniform(-yaw_spread, yaw_spread))
    robot = env.robot
    q, err = env.kinematics.solve_ik(pos, rot, env.joint_positions[:7], q_nominal=robot.home)
    if err > 1e-3:
        raise ValueError(f'offset start {pos.round(3).tolist()} is out of reach '
                         f'(IK error {err:.3g})')
    env.place_arm(np.clip(q, robot.q_min, robot.q_max))
    return pos


def make_expert(env: SimEnv, horizon: int = 10, dt: float = 0.05) -> ScriptedExpert:
    return ScriptedExpert(env, horizon=horizon, dt=dt)


def run_expert_episode(env: SimEnv, max_time: float = 20.0, mode: str = 'joint',
                       horizon: int = 10, dt: float = 0.05,
                       on_chunk: Callable[[dict, np.ndarray], None] | None = None) -> bool:
    """Run the expert from the env's current state until done (or max_time sim seconds).

    mode 'joint': joint chunks through `env.execute_actions`; 'twist': Servo twists each dt.
    `on_chunk(obs, actions)` sees every observation and the chunk chosen for it (recording).
    Returns env.success() at the end.
    """
    expert = ScriptedExpert(env, horizon=horizon, dt=dt)
    end = env.time + max_time
    if mode == 'joint':
        while env.time < end and not expert.done:
            obs = env.observe() if on_chunk is not None else None
            actions = expert.next_chunk(obs)
            if on_chunk is not None:
                on_chunk(obs, actions)
            env.execute_actions(actions, dt)
    elif mode == 'twist':
        while env.time < end and not expert.done:
            linear, angular, width = expert.next_twist()
            env.command_twist(linear, angular)
            if abs(width - env.gripper_command.width) > 1e-4:
                env.command_gripper(width)
            env.step(dt)
    else:
        raise ValueError(f"mode must be 'joint' or 'twist', got {mode!r}")
    env.step(0.3)
    return env.success()
