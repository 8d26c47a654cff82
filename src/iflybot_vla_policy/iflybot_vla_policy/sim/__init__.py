"""MuJoCo simulation of the FR3 + Franka Hand work cell (no ROS; the ROS bridge is ros/sim_node).

Quick start::

    from iflybot_vla_policy.sim import make_env, make_expert, TASKS, TRAIN_SEEDS, EVAL_SEEDS
    env = make_env('pick_place', seed=0, image_size=(224, 224), render=True)
    obs = env.reset(seed=TRAIN_SEEDS[0])   # {'images': {...}, 'state': (8,), 'instruction'}
    expert = make_expert(env, horizon=10, dt=0.05)
    while not expert.done:
        actions = expert.next_chunk(obs)     # float32 (10, 8): 7 joint targets + width
        env.execute_actions(actions, dt=0.05)
        obs = env.observe()
    env.success()                          # -> bool

Environment (`SimEnv`, built by `make_env(task, seed=0, image_size=(H, W), render=True,
camera_sizes={'wrist_camera': (H, W)}, home_noise=0.05)`):

- `reset(seed=None) -> obs`: new randomised scene (object poses, colours, instruction, a
  slightly perturbed home pose); seed None = previous seed + 1. Same seed, same scene.
- `step(n_or_seconds)`: an int is a number of 2 ms physics steps, a float is sim seconds.
- `observe() -> {'images': {'scene_camera': uint8 (H, W, 3), 'wrist_camera': ...},
  'state': float32 (8,) = 7 joint positions (rad) + gripper width (m), 'instruction': str}`;
  images is {} when render=False. `render(cameras=...) -> {name: uint8 (H, W, 3)}`.
- `success() -> bool`; `objects() -> list[ObjectState]` (name, kind, color, position (3,),
  quaternion wxyz (4,), size = half extents (3,), opening for drawers); `instruction`.
- `time` (sim s), `joint_positions` / `joint_velocities` / `joint_efforts` (9,) in
  `joint_names` order (fr3_joint1..7, fr3_finger_joint1/2), `gripper_width`, `tcp_pose()`,
  `desired` (the arm reference), `gripper_command` (the one in effect),
  `camera_info(name) -> CameraInfo` (pinhole intrinsics).
- Commands, as the real stack takes them:
  `command_joint_trajectory(positions (N, 7), times (N,), velocities=None,
  accelerations=None, joint_names=None, start_time=0.0)` with JointTrajectoryController
  semantics (`sim/trajectory.py`; raises `TrajectoryError(reason)` when rejected);
  `command_twist(linear (3,), angular (3,), frame='base'|'tcp')` (MoveIt-Servo-like, velocity
  and acceleration limited, stops 0.2 s after the last twist);
  `command_gripper(width, speed=None, force=None, grasp=False)` (grasp closes fully with at
  most `force` N per finger; a move goes to `width` with at most 40 N);
  `execute_actions(actions (horizon, 8), dt)`: a joint-mode action chunk as one trajectory
  plus per-step gripper widths, then steps horizon * dt.

Tasks (`TASKS`: pick_place, stack, push, drawer) randomise poses and named colours (`COLORS`)
and sample instructions from several templates. Use `TRAIN_SEEDS` for data and `EVAL_SEEDS`
(disjoint) for evaluation. `make_expert(env)` / `run_expert_episode(env, max_time)` give the
scripted expert (`sim/expert.py`).

Rendering is offscreen: `MUJOCO_GL` is chosen before MuJoCo loads (EGL if a device is present,
else OSMesa; set MUJOCO_GL yourself to override). Shadows, reflections and skybox are off.
"""
from __future__ import annotations

from iflybot_vla_policy.sim.gl import select_gl_backend

GL_BACKEND = select_gl_backend()

from iflybot_vla_policy.sim.env import CAMERAS, SimEnv, make_env  # noqa: E402
from iflybot_vla_policy.sim.expert import (  # noqa: E402
    ScriptedExpert,
    make_expert,
    run_expert_episode,
)
from iflybot_vla_policy.sim.tasks import (  # noqa: E402
    COLORS,
    EVAL_SEEDS,
    TASKS,
    TRAIN_SEEDS,
    ObjectState,
)
from iflybot_vla_policy.sim.trajectory import TrajectoryError  # noqa: E402

__all__ = ['CAMERAS', 'COLORS', 'EVAL_SEEDS', 'GL_BACKEND', 'TASKS', 'TRAIN_SEEDS',
           'ObjectState', 'ScriptedExpert', 'SimEnv', 'TrajectoryError', 'make_env',
           'make_expert', 'run_expert_episode']
