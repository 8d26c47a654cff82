"""Closed-loop rollouts in the MuJoCo simulation, without ROS (`iflybot eval --direct`).

The loop is the one the policy node runs, made synchronous so that results are deterministic
given the seeds: observe, infer a chunk, vet it with the safety filter, send it to the simulated
JointTrajectoryController, execute `replan_steps` actions, repeat until success or timeout.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from iflybot_vla_policy.eval.metrics import limit_violations, rms_jerk
from iflybot_vla_policy.eval.report import EpisodeResult, hold_category
from iflybot_vla_policy.safety import SafetyFilter
from iflybot_vla_policy.sim.env import SimEnv, chunk_to_trajectory, make_env
from iflybot_vla_policy.sim.expert import ScriptedExpert
from iflybot_vla_policy.sim.tasks import EVAL_SEEDS


class InferencePolicy(Protocol):
    def infer(self, obs: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RolloutConfig:
    max_time_s: float = 20.0         # simulated seconds before an episode counts as failed
    replan_steps: int = 0            # actions executed per chunk; 0 = the whole chunk
    image_size: tuple[int, int] = (224, 224)
    video: bool = False
    video_every: int = 2             # record every n-th action step (keeps rendering cheap)
    instruction_variant: int = 0     # Task.retarget: the instruction names another object


NOISE_KINDS = ('offset', 'iid')


class ExpertPolicy:
    """The scripted expert behind the `infer` interface: validates the evaluation harness and,
    with `noise`, measures how much action error the tasks tolerate."""

    def __init__(self, horizon: int = 10, dt: float = 0.05, noise: float = 0.0,
                 noise_kind: str = 'offset', seed: int = 0) -> None:
        if noise_kind not in NOISE_KINDS:
            raise ValueError(f'noise_kind must be one of {NOISE_KINDS}, got {noise_kind!r}')
        if not noise >= 0.0:
            raise ValueError(f'noise must be >= 0 rad, got {noise}')
        self.horizon, self.dt = horizon, dt
        self.noise, self.noise_kind = noise, noise_kind
        self._rng = np.random.default_rng(seed)
        self._expert: ScriptedExpert | None = None
        self.env: SimEnv | None = None

    def bind(self, env: SimEnv, replan_steps: int = 0) -> None:
        """The expert plans from ground truth, so it is bound to the env of each episode.

        Its plan clock advances by a whole chunk per call, so when the loop executes only
        `replan_steps` actions of each chunk it must plan exactly that many (a 10-step plan cut
        after 4 runs ahead of the arm and fails every episode).
        """
        self.env = env
        horizon = min(self.horizon, replan_steps) if replan_steps else self.horizon
        self._expert = ScriptedExpert(env, horizon=horizon, dt=self.dt)

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        if self._expert is None:
            raise RuntimeError('ExpertPolicy.bind(env) must be called before infer')
        actions = self._expert.next_chunk(obs)                          # (horizon, 8)
        return {'actions': self.perturb(actions).astype(np.float32), 'dt': self.dt}

    def perturb(self, actions: np.ndarray) -> np.ndarray:
        """Gaussian error of `noise` rad on the arm joints (not the gripper): one offset for
        the whole chunk ('offset', like a mislocalised target) or one per action ('iid',
        jitter). Tells how precise a learned policy must be to succeed."""
        if not self.noise:
            return actions
        out = actions.copy()
        n = out.shape[1] - 1
        shape = (n,) if self.noise_kind == 'offset' else (len(out), n)
        out[:, :n] += self._rng.normal(0.0, self.noise, shape)
        return out


def eval_seeds(count: int, offset: int = 0) -> list[int]:
    """The first `count` held-out evaluation seeds (disjoint from the training seeds)."""
    return [EVAL_SEEDS[offset + i] for i in range(count)]


def run_episode(policy: InferencePolicy, task: str, seed: int, config: RolloutConfig,
                safety: SafetyFilter,
                on_frame: Callable[[np.ndarray], None] | None = None) -> EpisodeResult:
    """One closed-loop episode; deterministic given the seed and a deterministic policy."""
    # The expert plans from ground truth: rendering its observations would only cost time.
    env = make_env(task, seed=seed, image_size=config.image_size,
                   render=not isinstance(policy, ExpertPolicy),
                   variant=config.instruction_variant)
    try:
        if isinstance(policy, ExpertPolicy):
            policy.bind(env, config.replan_steps)
        return _run(policy, env, task, seed, config, safety, on_frame)
    finally:
        env.close()


def _run(policy: InferencePolicy, env: SimEnv, task: str, seed: int, config: RolloutConfig,
         safety: SafetyFilter, on_frame: Callable[[np.ndarray], None] | None) -> EpisodeResult:
    robot = env.robot
    start_time = env.time
    times: list[float] = [env.time]
    measured: list[np.ndarray] = [env.joint_positions[:robot.n_joints]]
    commanded_q: list[np.ndarray] = []
    commanded_dq: list[np.ndarray] = []
    latencies: list[float] = []
    holds = 0
    hold_reasons: dict[str, int] = {}
    chunks = 0
    success_at: float | None = None
    grasp_offset: list[float] | None = None   # TCP minus the named object at the first close
    closing_below = 0.5 * robot.gripper.max_width   # a command under half open: a grasp attempt

    def advance(dt: float) -> None:
        """Step the physics one action period, sampling joints (and a video frame)."""
        env.step(dt)
        times.append(env.time)
        measured.append(env.joint_positions[:robot.n_joints])
        if on_frame is not None and len(times) % config.video_every == 0:
            on_frame(env.render(('scene_camera',))['scene_camera'])

    while env.time - start_time < config.max_time_s:
        obs = env.observe()
        tic = time.perf_counter()
        out = policy.infer(obs)
        latencies.append((time.perf_counter() - tic) * 1e3)
        chunks += 1
        actions = np.asarray(out['actions'], dtype=np.float64)     # (horizon, 8)
        dt = float(out['dt'])
        check = safety.check_chunk(actions, dt, env.joint_positions[:robot.n_joints])
        if not check.ok:
            holds += 1
            reason = hold_category(check.hold_reason)
            hold_reasons[reason] = hold_reasons.get(reason, 0) + 1
            advance(dt)       # the controller holds its last reference
            continue
        n_exec = len(check.positions)
        if config.replan_steps:
            n_exec = min(n_exec, config.replan_steps)
        positions, stamps, velocities = chunk_to_trajectory(
            check.positions, dt, env.desired.positions, robot)
        commanded_q.extend(positions)
        commanded_dq.extend(velocities)
        env.command_joint_trajectory(positions, stamps, velocities)
        for k in range(n_exec):
            width = float(check.gripper[k])
            if abs(width - env.gripper_command.width) > 1e-4:
                if grasp_offset is None and width < closing_below and env.task.grasps:
                    grasp_offset = grasp_offset_of(env)
                env.command_gripper(width)
            advance(dt)
            if env.success():
                success_at = env.time - start_time
                break
        if success_at is not None:
            break
    violations = limit_violations(robot, np.asarray(commanded_q).reshape(-1, robot.n_joints),
                                  np.asarray(commanded_dq).reshape(-1, robot.n_joints))
    violations['safety_holds'] = holds
    return EpisodeResult(
        task=task, seed=seed, instruction=env.instruction, success=success_at is not None,
        duration_s=env.time - start_time, time_to_success_s=success_at,
        inference_ms=latencies, rms_jerk=rms_jerk(np.asarray(times), np.asarray(measured)),
        limit_violations=violations, chunks=chunks, hold_reasons=hold_reasons,
        grasp_offset_m=grasp_offset, grasp_measured=bool(env.task.grasps))


def grasp_offset_of(env: SimEnv) -> list[float]:
    """TCP minus the object the instruction names (base frame, m): how far off a grasp was."""
    tcp, _ = env.tcp_pose()
    return [float(v) for v in tcp - env.task.grounding_points(env)[0]]
