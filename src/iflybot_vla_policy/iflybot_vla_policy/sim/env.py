"""The simulated FR3 work cell: physics, arm/gripper control, cameras, task bookkeeping.

See the package docstring (`iflybot_vla_policy.sim`) for the API other modules code against.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mujoco
import numpy as np

from iflybot_vla_policy.robot import RobotSpec, load_robot
from iflybot_vla_policy.sim.kinematics import ArmKinematics
from iflybot_vla_policy.sim.model import FINGER_TRAVEL, PHYSICS_DT, scene_xml
from iflybot_vla_policy.sim.servo import CartesianServo, ServoConfig
from iflybot_vla_policy.sim.tasks import ObjectState, Task, make_task
from iflybot_vla_policy.sim.trajectory import (
    COMMAND_DT,
    CommandLimits,
    CommandMonitor,
    DesiredState,
    JointTrajectory,
    Reflex,
    TrajectoryController,
    TrajectoryError,
    make_trajectory,
)

CAMERAS = ('scene_camera', 'wrist_camera')
DEFAULT_IMAGE_SIZE = (224, 224)      # (height, width) of every camera unless given
REFLEX_MODES = ('abort', 'report', 'off')
# Servo's joint acceleration bound, as a fraction of the FR3's: Servo does not limit jerk, so a
# twist from rest steps the acceleration 0 -> bound within one 1 ms command (jerk = bound / 1 ms,
# which must stay under the FR3's 5000 rad/s^3).
SERVO_ACCEL_FRACTION = 0.4


@dataclass(frozen=True)
class GripperCommand:
    width: float      # m, target opening 0..0.08
    speed: float      # m/s
    force: float      # N, force limit per finger
    grasp: bool       # grasp (force-limited squeeze) or move


@dataclass(frozen=True)
class CameraInfo:
    """Pinhole intrinsics of a rendered camera (for sensor_msgs/CameraInfo)."""

    name: str
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float


class SimEnv:
    """One task in one MuJoCo model; `reset(seed)` draws a new scene. Times are sim seconds."""

    control_gain_hz = 8.0        # bandwidth of the computed-torque joint loop
    default_grasp_force = 30.0   # N, used when a command gives no force
    move_force = 40.0            # N, finger force limit while moving (not grasping)

    def __init__(self, task: str, seed: int = 0, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
                 render: bool = True, robot: RobotSpec | None = None,
                 camera_sizes: dict[str, tuple[int, int]] | None = None,
                 home_noise: float = 0.05, fast_visuals: bool = True,
                 allow_nonzero_velocity_at_trajectory_end: bool = False,
                 twist_timeout: float = 0.2, variant: int = 0,
                 reflexes: str = 'report') -> None:
        self.robot = robot or load_robot()
        self.variant = variant       # instruction variant of every reset (Task.retarget)
        self.task: Task = make_task(task)
        self.task_name = task
        self.seed = seed
        self.home_noise = home_noise
        self.render_enabled = render
        self._fast_visuals = fast_visuals
        sizes = {c: tuple(image_size) for c in CAMERAS}
        sizes.update({k: tuple(v) for k, v in (camera_sizes or {}).items()})
        unknown = sorted(set(sizes) - set(CAMERAS))
        if unknown:
            raise ValueError(f'unknown camera(s) {unknown}; cameras: {list(CAMERAS)}')
        self.camera_sizes: dict[str, tuple[int, int]] = sizes   # name -> (height, width)
        max_h = max(h for h, _ in sizes.values())
        max_w = max(w for _, w in sizes.values())
        self.model = mujoco.MjModel.from_xml_string(scene_xml(
            self.robot, self.task.scene(), offwidth=max(max_w, 640), offheight=max(max_h, 480),
            fast_visuals=fast_visuals))
        self.data = mujoco.MjData(self.model)
        r = self.robot
        self._arm_qpos = np.array([self.model.joint(n).qposadr[0] for n in r.arm_joint_names])
        self._arm_dof = np.array([self.model.joint(n).dofadr[0] for n in r.arm_joint_names])
        self._finger_qpos = np.array([self.model.joint(n).qposadr[0]
                                      for n in r.finger_joint_names])
        self._finger_dof = np.array([self.model.joint(n).dofadr[0]
                                     for n in r.finger_joint_names])
        self._arm_act = np.array([self.model.actuator(n).id for n in r.arm_joint_names])
        self._finger_act = np.array([self.model.actuator(n).id for n in r.finger_joint_names])
        self.kinematics = ArmKinematics(self.model, r.arm_joint_names, r.q_min, r.q_max)
        self.servo = CartesianServo(
            ServoConfig(r.max_linear_velocity, r.max_angular_velocity, r.dq_max,
                        r.ddq_max * SERVO_ACCEL_FRACTION,
                        r.q_min, r.q_max, timeout=twist_timeout), self.kinematics.jacobian)
        wn = 2 * math.pi * self.control_gain_hz
        self._kp, self._kd = wn * wn, 2.0 * wn
        # Index arrays become slices when contiguous (they are: the robot is the first tree),
        # and MjData arrays are cached as views: both matter at 500 Python calls per sim second.
        self._arm_qpos, self._arm_dof = _as_slice(self._arm_qpos), _as_slice(self._arm_dof)
        self._arm_act, self._finger_act = _as_slice(self._arm_act), _as_slice(self._finger_act)
        self._views = _DataViews(self.data)
        self._tau_max = self.robot.tau_max.copy()
        self._applied_force = math.nan
        self._acc = np.zeros(self.model.nv)      # (nv,) scratch for M @ qacc
        self._force = np.zeros(self.model.nv)
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self.trajectory = TrajectoryController(
            r.arm_joint_names, r.q_min, r.q_max, r.home,
            allow_nonzero_velocity_at_trajectory_end=allow_nonzero_velocity_at_trajectory_end)
        self._servo_mode = False
        # libfranka's limits on the command stream (sim/trajectory.py): 'abort' stops the motion
        # and holds, as the FR3 does; 'report' only records; 'off' does not check.
        if reflexes not in REFLEX_MODES:
            raise ValueError(f'reflexes must be one of {REFLEX_MODES}, got {reflexes!r}')
        self.reflex_mode = reflexes
        self.monitor = (CommandMonitor(r.arm_joint_names, CommandLimits.from_robot(r))
                        if reflexes != 'off' else None)
        self.reflexes: list[Reflex] = []     # this episode's violations, oldest first
        self._in_violation = False           # 'report': the stream is beyond a limit now
        self._desired = _at_rest(r.home)
        self._gripper = GripperCommand(r.gripper.max_width, r.gripper.max_speed,
                                       self.move_force, False)
        self._finger_setpoint = r.gripper.max_width / 2
        self.reset(seed)

    # ----------------------------------------------------------------------------- episode
    def reset(self, seed: int | None = None, variant: int | None = None) -> dict:
        """New scene from `seed` (None: the next seed), its instruction variant `variant`
        (None: as before); returns the observation."""
        self.seed = self.seed + 1 if seed is None else int(seed)
        if variant is not None:
            self.variant = int(variant)
        rng = np.random.default_rng(self.seed)
        mujoco.mj_resetData(self.model, self.data)
        r = self.robot
        q0 = np.clip(r.home + rng.uniform(-1, 1, r.n_joints) * self.home_noise, r.q_min, r.q_max)
        self.data.qpos[self._arm_qpos] = q0
        self.data.qpos[self._finger_qpos] = FINGER_TRAVEL
        self.task.reset(self, rng)
        self.task.retarget(self, self.variant)
        mujoco.mj_forward(self.model, self.data)
        self.trajectory.hold(q0, self.time)
        self.servo.reset(q0)
        self._servo_mode = False
        self.reflexes = []
        if self.monitor is not None:
            self.monitor.reset(q0, self.time)
        self._desired = _at_rest(q0)
        self._gripper = GripperCommand(r.gripper.max_width, r.gripper.max_speed,
                                       self.move_force, False)
        self._finger_setpoint = r.gripper.max_width / 2
        self.step(0.2)   # let objects settle
        return self.observe()

    def place_arm(self, q: np.ndarray, settle: float = 0.2) -> None:
        """Put the arm at rest at joints q (n_joints,) and hold it there; the objects stay put.

        For start states a reset cannot draw (demos that begin off the expert's path)."""
        q = np.asarray(q, np.float64)
        r = self.robot
        if q.shape != (r.n_joints,) or not np.all(np.isfinite(q)):
            raise ValueError(f'place_arm needs {r.n_joints} finite joint positions, got {q!r}')
        if np.any(q < r.q_min) or np.any(q > r.q_max):
            raise ValueError(f'place_arm: {q.round(3).tolist()} is outside the joint limits')
        self.data.qpos[self._arm_qpos] = q
        self.data.qvel[self._arm_dof] = 0.0
        mujoco.mj_forward(self.model, self.data)
        self.trajectory.hold(q, self.time)
        self.servo.reset(q)
        self._servo_mode = False
        if self.monitor is not None:
            self.monitor.reset(q, self.time)
        self._desired = _at_rest(q)
        self.step(settle)

    @property
    def instruction(self) -> str:
        return self.task.state.instruction

    def success(self) -> bool:
        return self.task.success(self)

    def objects(self) -> list[ObjectState]:
        return self.task.objects(self)

    # ----------------------------------------------------------------------------- state
    @property
    def time(self) -> float:
        return float(self.data.time)

    @property
    def joint_positions(self) -> np.ndarray:
        """(9,): 7 arm joints + 2 finger joints (each 0..0.04 m), franka_ros2 order."""
        return np.concatenate([self.data.qpos[self._arm_qpos], self.data.qpos[self._finger_qpos]])

    @property
    def joint_velocities(self) -> np.ndarray:
        """(9,) rad/s and m/s."""
        return np.concatenate([self.data.qvel[self._arm_dof], self.data.qvel[self._finger_dof]])

    @property
    def joint_efforts(self) -> np.ndarray:
        """(9,) Nm and N applied by the actuators."""
        return np.concatenate([self.data.actuator_force[self._arm_act],
                               self.data.actuator_force[self._finger_act]])

    @property
    def joint_names(self) -> tuple[str, ...]:
        return self.robot.arm_joint_names + self.robot.finger_joint_names

    @property
    def gripper_width(self) -> float:
        return float(np.sum(self.data.qpos[self._finger_qpos]))

    @property
    def gripper_command(self) -> GripperCommand:
        """The gripper command in effect (width target, speed, force, grasp)."""
        return self._gripper

    @property
    def desired(self) -> DesiredState:
        """The arm's current reference (positions, velocities, accelerations; each (7,))."""
        return self._desired

    def tcp_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Measured TCP position (3,) and rotation (3, 3) in the base frame."""
        sid = self.kinematics.site_id
        return self.data.site_xpos[sid].copy(), self.data.site_xmat[sid].reshape(3, 3).copy()

    def state(self) -> np.ndarray:
        """float32 (8,): 7 arm joint positions + gripper opening width (m)."""
        return np.concatenate([self.data.qpos[self._arm_qpos],
                               [self.gripper_width]]).astype(np.float32)

    def observe(self) -> dict:
        """The core observation dict: images (if rendering), state (8,), instruction."""
        return {'images': self.render() if self.render_enabled else {},
                'state': self.state(), 'instruction': self.instruction}

    # ----------------------------------------------------------------------------- commands
    def command_joint_trajectory(
            self, positions: np.ndarray | Sequence[Sequence[float]] | JointTrajectory,
            times: Sequence[float] | np.ndarray | None = None,
            velocities: np.ndarray | Sequence[Sequence[float]] | None = None,
            accelerations: np.ndarray | Sequence[Sequence[float]] | None = None,
            joint_names: Sequence[str] | None = None, start_time: float = 0.0) -> None:
        """Send a trajectory (positions (n_points, 7), times_from_start (n_points,)).

        JTC semantics (see sim/trajectory.py); start_time 0 = now. Raises TrajectoryError with
        the reason if it is rejected; the running motion then continues unchanged.
        """
        if isinstance(positions, JointTrajectory):
            traj = positions
        else:
            if times is None:
                raise ValueError('times (time_from_start per point) are required')
            traj = make_trajectory(joint_names or self.robot.arm_joint_names, times, positions,
                                   velocities, accelerations, start_time)
        reason = self.trajectory.validate(traj, self.time)
        if reason is not None:
            raise TrajectoryError(reason)
        if self._servo_mode:
            # Continue from Servo's moving reference without a velocity jump.
            self.trajectory.hold(self._desired.positions, self.time, self._desired)
        self.trajectory.set_trajectory(traj, self.time)
        self._servo_mode = False

    def command_twist(self, linear: Sequence[float], angular: Sequence[float] = (0, 0, 0),
                      frame: str = 'base') -> None:
        """Servo: TCP linear (m/s) and angular (rad/s) velocity, in the base or 'tcp' frame."""
        lin, ang = np.asarray(linear, np.float64), np.asarray(angular, np.float64)
        if frame in ('tcp', 'fr3_hand_tcp'):
            rot = self.kinematics.tcp_pose(self._desired.positions)[1]
            lin, ang = rot @ lin, rot @ ang
        elif frame not in ('base', 'fr3_link0', 'world', ''):
            raise ValueError(f"unknown twist frame {frame!r}; use 'base' or 'tcp'")
        if not self._servo_mode:
            self.servo.reset(self._desired.positions, self._desired.velocities)
            self._servo_mode = True
        self.servo.command(lin, ang, self.time)

    def command_gripper(self, width: float, speed: float | None = None,
                        force: float | None = None, grasp: bool = False) -> None:
        """Move the fingers to `width` (m) at `speed`; grasp limits the squeeze to `force`."""
        g = self.robot.gripper
        values = {'width': width, 'speed': speed, 'force': force}
        for key, value in values.items():
            if value is not None and not math.isfinite(value):
                raise ValueError(f'gripper {key} is not finite ({value})')
        speed = g.max_speed if speed is None or speed <= 0 else min(speed, g.max_speed)
        if force is None or force <= 0:
            force = self.default_grasp_force if grasp else self.move_force
        self._gripper = GripperCommand(float(np.clip(width, 0.0, g.max_width)), speed,
                                       float(min(force, g.max_force)), bool(grasp))

    def execute_actions(self, actions: np.ndarray, dt: float) -> None:
        """Run a joint-mode action chunk (horizon, n_joints + 1): a trajectory through the joint
        targets at dt, dt*2, ... and the gripper width target of each step; steps horizon * dt.
        """
        actions = np.asarray(actions, np.float64)
        n = self.robot.n_joints
        if actions.ndim != 2 or actions.shape[1] != n + 1:
            raise ValueError(f'actions must be (horizon, {n + 1}), got {actions.shape}')
        self.command_joint_trajectory(*chunk_to_trajectory(
            actions[:, :n], dt, self._desired.positions, self.robot))
        steps_per_action = max(1, round(dt / PHYSICS_DT))
        for width in actions[:, n]:
            if abs(width - self._gripper.width) > 1e-4:
                self.command_gripper(float(width))
            self.step(steps_per_action)

    # ----------------------------------------------------------------------------- physics
    def step(self, n_or_seconds: int | float = 1) -> None:
        """Advance the simulation: an int is a number of physics steps (2 ms), a float seconds."""
        if isinstance(n_or_seconds, (int, np.integer)):
            steps = int(n_or_seconds)
        else:
            steps = max(0, round(float(n_or_seconds) / PHYSICS_DT))
        for _ in range(steps):
            self._physics_step()

    def _physics_step(self) -> None:
        """One 2 ms step: reference from the trajectory (or Servo), computed torque, fingers."""
        m, d, v = self.model, self.data, self._views
        mujoco.mj_step1(m, d)
        t = float(d.time)
        monitor = self.monitor
        if self._servo_mode:
            # Servo integrates at libfranka's 1 kHz, so its stream is checked as the robot would.
            q = self.servo.update(COMMAND_DT, t - COMMAND_DT)[0]
            reflex = monitor.check(t - COMMAND_DT, q) if monitor is not None else None
            q, dq, ddq = self.servo.update(COMMAND_DT, t)
            self._desired = DesiredState(q, dq, ddq)
            if monitor is not None:
                reflex = monitor.check(t, q) or reflex
        else:
            if monitor is not None:
                # The command stream at 1 kHz: the sample between the physics steps, then t.
                half = self.trajectory.sample(t - COMMAND_DT).positions
                reflex = monitor.check(t - COMMAND_DT, half)
            self._desired = self.trajectory.sample(t)
            if monitor is not None:
                reflex = monitor.check(t, self._desired.positions) or reflex
        if monitor is not None:
            # 'report' counts each excursion beyond a limit once (the robot would abort at its
            # first sample), not every sample of it.
            if reflex is not None and not self._in_violation:
                self.reflexes.append(reflex)
                if self.reflex_mode == 'abort':
                    self._abort(t)
                else:
                    self._in_violation = True
            elif reflex is None:
                self._in_violation = False
        des = self._desired
        arm_dof = self._arm_dof
        error = des.positions - v.qpos[self._arm_qpos]
        self._acc[arm_dof] = (des.accelerations + self._kp * error
                              + self._kd * (des.velocities - v.qvel[arm_dof]))
        mujoco.mj_mulM(m, d, self._force, self._acc)
        tau = self._force[arm_dof] + v.qfrc_bias[arm_dof]
        v.ctrl[self._arm_act] = np.minimum(np.maximum(tau, -self._tau_max), self._tau_max)
        g = self._gripper
        target = 0.0 if g.grasp else g.width / 2
        step = g.speed / 2 * PHYSICS_DT
        self._finger_setpoint += min(step, max(-step, target - self._finger_setpoint))
        v.ctrl[self._finger_act] = self._finger_setpoint
        if g.force != self._applied_force:
            m.actuator_forcerange[self._finger_act] = (-g.force, g.force)
            self._applied_force = g.force
        mujoco.mj_step2(m, d)

    def _abort(self, t: float) -> None:
        """What the FR3 does on a motion-generator error: drop the motion, hold where it is."""
        q = self._views.qpos[self._arm_qpos].copy()
        self.trajectory.hold(q, t)
        self.servo.reset(q)
        self._servo_mode = False
        self.monitor.reset(q, t)
        self._desired = _at_rest(q)

    # ----------------------------------------------------------------------------- cameras
    def camera_info(self, camera: str) -> CameraInfo:
        height, width = self.camera_sizes[camera]
        fovy = math.radians(float(self.model.cam_fovy[self.model.camera(camera).id]))
        f = height / 2 / math.tan(fovy / 2)
        return CameraInfo(camera, width, height, f, f, (width - 1) / 2, (height - 1) / 2)

    def _renderer(self, size: tuple[int, int]) -> mujoco.Renderer:
        if size not in self._renderers:
            renderer = mujoco.Renderer(self.model, size[0], size[1])
            flags = renderer.scene.flags
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                         mujoco.mjtRndFlag.mjRND_SKYBOX):
                flags[flag] = not self._fast_visuals
            self._renderers[size] = renderer
        return self._renderers[size]

    def render(self, cameras: Sequence[str] = CAMERAS) -> dict[str, np.ndarray]:
        """{camera: uint8 (H, W, 3) RGB} rendered offscreen now."""
        out = {}
        for cam in cameras:
            renderer = self._renderer(self.camera_sizes[cam])
            renderer.update_scene(self.data, camera=cam)
            out[cam] = renderer.render()
        return out

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()

    def __enter__(self) -> SimEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_slice(index: np.ndarray) -> slice | np.ndarray:
    """A contiguous ascending index array as a slice (faster numpy indexing)."""
    if len(index) and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


class _DataViews:
    """Cached numpy views of the MjData arrays the control loop touches."""

    def __init__(self, data: mujoco.MjData) -> None:
        self.qpos, self.qvel, self.ctrl, self.qfrc_bias = (data.qpos, data.qvel, data.ctrl,
                                                           data.qfrc_bias)


def _at_rest(q: np.ndarray) -> DesiredState:
    """The arm's reference standing still at joints q."""
    return DesiredState(np.array(q, np.float64), np.zeros_like(q, np.float64),
                        np.zeros_like(q, np.float64))


def chunk_to_trajectory(positions: np.ndarray, dt: float, start: np.ndarray,
                        robot: RobotSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint targets (horizon, n_joints) at dt spacing -> (positions, times, velocities) for JTC.

    Velocities are central differences (the first uses `start`, the current reference); the
    last is zero as JTC requires. Targets are clipped to the joint limits.
    """
    pos = np.clip(np.asarray(positions, np.float64), robot.q_min, robot.q_max)
    horizon = pos.shape[0]
    times = dt * np.arange(1, horizon + 1)
    padded = np.vstack([start[None], pos, pos[-1:]])
    vel = (padded[2:] - padded[:-2]) / (2 * dt)
    vel[-1] = 0.0
    vel = np.clip(vel, -robot.dq_max, robot.dq_max)
    return pos, times, vel


def make_env(task: str, seed: int = 0, image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
             render: bool = True, **kwargs: object) -> SimEnv:
    """Build the simulated work cell for `task` and reset it with `seed`."""
    return SimEnv(task, seed=seed, image_size=image_size, render=render, **kwargs)
