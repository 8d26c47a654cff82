"""Closed-loop rollouts in the MuJoCo simulation, without ROS (`iflybot eval --direct`).

The loop is the one the policy node runs, made synchronous so that results are deterministic
given the seeds: observe, infer a chunk, vet it with the safety filter, send it to the simulated
JointTrajectoryController, execute `replan_steps` actions, repeat until success or timeout.

`inference_delay_s` simulates a robot that keeps moving while the policy computes: the chunk
inferred from the observation at period P takes over only at P + d (d = delay / dt, rounded);
until then the previous chunk's actions run. How the new chunk joins the old one is `chunking`:
'naive' switches to the new chunk's actions from step d on; 'blend' mixes the old chunk into the
new one as the policy node's output-level blend does (chunking.blend_weights, flat-ended 'smooth'
decay, no commit latency in the simulation); 'rtc' asks the policy for real-time chunking
(rtc.py: the old chunk's remainder passed to `infer`, the first d actions frozen to it, the
overlap guided) and then switches as naive does. Observations come every s actions (s =
replan_steps, else the chunk; with a delay d <= s <= horizon - d, so the old chunk covers the
delay). With no delay and 'naive' the loop is the synchronous one above.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from iflybot_vla_policy.chunking import blend_weights
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
    inference_delay_s: float = 0.0   # simulated seconds from observation to the new chunk
    chunking: str = 'naive'          # how a new chunk joins the running one: CHUNKING

    def __post_init__(self) -> None:
        if self.chunking not in CHUNKING:
            raise ValueError(f'chunking must be one of {list(CHUNKING)}, got {self.chunking!r}')
        if not self.inference_delay_s >= 0.0:
            raise ValueError(f'inference_delay_s must be >= 0, got {self.inference_delay_s}')
        if self.replan_steps < 0:
            raise ValueError(f'replan_steps must be >= 0, got {self.replan_steps}')


CHUNKING = ('naive', 'blend', 'rtc')
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

    plan: np.ndarray | None = None   # (k, n_joints + 1) the running chunk (vetted), or None
    plan_start = 0                    # the period of plan[0]
    period = 0                        # action periods since the start
    delay = 0                         # d: periods the inference takes, from the policy's dt

    def run_plan(steps: int) -> bool:
        """Run `steps` periods of the plan (the arm follows the trajectory sent with it; the
        gripper is commanded per period); True once the task succeeded."""
        nonlocal period, success_at, grasp_offset
        for _ in range(steps):
            k = period - plan_start
            if plan is not None and k < len(plan):
                width = float(plan[k, -1])
                if abs(width - env.gripper_command.width) > 1e-4:
                    if grasp_offset is None and width < closing_below and env.task.grasps:
                        grasp_offset = grasp_offset_of(env)
                    env.command_gripper(width)
            advance(dt)
            period += 1
            if env.success():
                success_at = env.time - start_time
                return True
        return False

    dt = 0.0
    while env.time - start_time < config.max_time_s:
        obs = env.observe()
        observed = period
        q_observed = env.joint_positions[:robot.n_joints]
        left = None if plan is None else plan[observed - plan_start:]   # on the new grid
        tic = time.perf_counter()
        if config.chunking == 'rtc' and left is not None and len(left):
            out = policy.infer(obs, previous=left, inference_delay=min(delay, len(left)))
        else:
            out = policy.infer(obs)
        latencies.append((time.perf_counter() - tic) * 1e3)
        chunks += 1
        actions = np.asarray(out['actions'], dtype=np.float64)     # (horizon, 8)
        dt = float(out['dt'])
        delay = int(round(config.inference_delay_s / dt))
        if 2 * delay > len(actions):
            raise ValueError(f'inference delay {config.inference_delay_s} s ({delay} actions) '
                             f'is more than half the chunk ({len(actions)} actions)')
        if delay and run_plan(delay):     # the old chunk runs while the policy computes
            break
        check = safety.check_chunk(actions, dt, q_observed)
        if check.ok and len(check.positions) <= delay:   # cut (workspace box) inside the delay
            check = dataclasses.replace(check, hold_reason='chunk truncated within the '
                                        'inference delay')
        if not check.ok:
            holds += 1
            reason = hold_category(check.hold_reason)
            hold_reasons[reason] = hold_reasons.get(reason, 0) + 1
            if not delay:     # the controller goes on with its last reference for a period
                advance(dt)
                period += 1
            continue
        horizon = len(check.positions)    # less than the policy's when the box cut it
        n_exec = min(config.replan_steps or len(actions), len(actions) - delay)
        n_exec = max(min(n_exec, horizon), delay, 1)
        new = np.column_stack([check.positions, check.gripper])          # (horizon, 8)
        if config.chunking == 'blend' and left is not None and len(left) > delay:
            new = _blend(left, new, delay)
        plan, plan_start = new, observed
        positions, stamps, velocities = chunk_to_trajectory(
            plan[delay:, :robot.n_joints], dt, env.desired.positions, robot)
        commanded_q.extend(positions)
        commanded_dq.extend(velocities)
        env.command_joint_trajectory(positions, stamps, velocities)
        if run_plan(n_exec - delay):
            break
    violations = limit_violations(robot, np.asarray(commanded_q).reshape(-1, robot.n_joints),
                                  np.asarray(commanded_dq).reshape(-1, robot.n_joints))
    violations['safety_holds'] = holds
    reflexes = dict(Counter(r.error for r in env.reflexes))
    return EpisodeResult(
        task=task, seed=seed, instruction=env.instruction, success=success_at is not None,
        duration_s=env.time - start_time, time_to_success_s=success_at,
        inference_ms=latencies, rms_jerk=rms_jerk(np.asarray(times), np.asarray(measured)),
        limit_violations=violations, chunks=chunks, hold_reasons=hold_reasons,
        grasp_offset_m=grasp_offset, grasp_measured=bool(env.task.grasps), reflexes=reflexes)


def _blend(old: np.ndarray, new: np.ndarray, delay: int) -> np.ndarray:
    """The policy node's output-level blend on the action grid: old (L, D) and new (H, D)
    from the same observation period; the old chunk's weight is 1 up to the splice (step
    `delay`) and decays smoothly to 0 at its last action (chunking.blend_weights)."""
    steps = np.arange(len(new), dtype=np.float64)
    w = blend_weights(steps, float(delay), float(len(old) - 1))[:, None]
    w[len(old):] = 0.0
    held = np.repeat(old[-1:], max(len(new) - len(old), 0), axis=0)    # w is 0 there
    return w * np.vstack([old, held])[:len(new)] + (1.0 - w) * new


def grasp_offset_of(env: SimEnv) -> list[float]:
    """TCP minus the object the instruction names (base frame, m): how far off a grasp was."""
    tcp, _ = env.tcp_pose()
    return [float(v) for v in tcp - env.task.grounding_points(env)[0]]
