"""Expert demonstrations straight from the simulator (no ROS), parallel over processes.

Each episode: reset the task at a training seed, let the scripted expert emit joint chunks at
the dataset's frame period, execute each chunk as one trajectory (as a policy would) and record
every frame on the way: both cameras, the state, and as action the commanded target for the
end of that frame period (joint targets + gripper width), the same "commanded" convention as
`bag2dataset`. Episodes are written in seed order with the dataset writer, so a run is
reproducible. With `offset_start` an episode begins with the hand hovering off the object to
pick, the states a policy's missed approach reaches and the expert's own path never does.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iflybot_vla_policy.data.lerobot_format import EpisodeData


@dataclass(frozen=True)
class DemoSpec:
    """What to generate; one spec is shipped to every worker process."""

    fps: int = 10                       # frames (and actions) per second
    image_size: tuple[int, int] = (128, 128)   # rendered (height, width) of both cameras
    horizon: int = 10                   # expert chunk length (actions per trajectory)
    max_time: float = 25.0              # sim seconds before an episode is cut off
    settle_time: float = 0.3            # s after the expert finishes, recorded as holding
    # (min, max) m: start each episode hovering this far off the object to pick (pick tasks),
    # so the demo shows the expert correcting a missed approach; None: the reset's start.
    offset_start: tuple[float, float] | None = None


OFFSET_STREAM = 0x0FF5           # second seed word of the offset-start draw (scene stays seed's)
_ENVS: dict[str, Any] = {}             # per worker process: one env per task, reused


def _env(task: str, spec: DemoSpec) -> Any:
    from iflybot_vla_policy.sim.env import make_env

    if task not in _ENVS:
        _ENVS[task] = make_env(task, seed=0, image_size=spec.image_size)
    return _ENVS[task]


def record_episode(task: str, seed: int, spec: DemoSpec = DemoSpec()) -> EpisodeData:
    """Run the expert on `task` at `seed`; every frame period is one recorded frame."""
    from iflybot_vla_policy.sim.env import chunk_to_trajectory
    from iflybot_vla_policy.sim.expert import ScriptedExpert, offset_start
    from iflybot_vla_policy.sim.model import PHYSICS_DT

    env = _env(task, spec)
    env.reset(seed)
    if spec.offset_start is not None:
        offset_start(env, np.random.default_rng([seed, OFFSET_STREAM]), spec.offset_start)
    dt = 1.0 / spec.fps
    steps = max(1, round(dt / PHYSICS_DT))
    expert = ScriptedExpert(env, horizon=spec.horizon, dt=dt)
    states, actions = [], []
    images: dict[str, list[np.ndarray]] = {}
    gripper = None
    end = env.time + spec.max_time

    def frame(action: np.ndarray) -> None:
        states.append(env.state())
        for cam, img in env.render().items():
            images.setdefault(cam, []).append(img)
        actions.append(np.asarray(action, np.float32))

    while env.time < end and not expert.done:
        chunk = expert.next_chunk()                                     # (horizon, 8)
        env.command_joint_trajectory(*chunk_to_trajectory(chunk[:, :7], dt,
                                                          env.desired.positions, env.robot))
        for action in chunk:
            frame(action)
            if gripper is None or abs(float(action[7]) - gripper) > 1e-4:
                gripper = float(action[7])
                env.command_gripper(gripper)
            env.step(steps)
    hold = np.concatenate([env.desired.positions, [gripper if gripper is not None
                                                   else env.gripper_width]])
    for _ in range(max(1, round(spec.settle_time * spec.fps))):
        frame(hold)
        env.step(steps)
    return EpisodeData(
        state=np.stack(states), action=np.stack(actions),
        images={cam: np.stack(v) for cam, v in images.items()},
        instruction=env.instruction, task_name=task, success=bool(env.success()),
        episode_id=f'{task}-{seed:06d}', operator_name='scripted_expert', seed=int(seed))


def _work(job: tuple[str, int, DemoSpec]) -> EpisodeData:
    return record_episode(*job)


def generate(tasks: Sequence[str], episodes: int, seed_start: int = 0,
             spec: DemoSpec = DemoSpec(), workers: int = 1) -> Iterator[EpisodeData]:
    """Episodes in order (task k % len(tasks), seed seed_start + k), from `workers` processes."""
    from iflybot_vla_policy.sim.tasks import EVAL_SEEDS, TRAIN_SEEDS

    jobs = [(tasks[k % len(tasks)], seed_start + k, spec) for k in range(episodes)]
    for _, seed, _ in jobs:
        if seed not in TRAIN_SEEDS or seed in EVAL_SEEDS:
            raise ValueError(f'seed {seed} is not a training seed (TRAIN_SEEDS = {TRAIN_SEEDS}); '
                             'evaluation seeds must stay held out')
    if workers <= 1:
        yield from map(_work, jobs)
        return
    import multiprocessing as mp

    with mp.get_context('spawn').Pool(workers) as pool:
        yield from pool.imap(_work, jobs)


def write_demos(out: Path, tasks: Sequence[str], episodes: int, seed_start: int = 0,
                spec: DemoSpec = DemoSpec(), workers: int = 1, success_only: bool = True,
                overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Generate and write a LeRobot v3.0 dataset at `out`; returns counts per task."""
    from tqdm.auto import tqdm

    from iflybot_vla_policy.data.lerobot_writer import LeRobotWriter, WriterConfig

    counts: dict[str, dict[str, int]] = {t: {'success': 0, 'failure': 0} for t in tasks}
    frames = 0
    with LeRobotWriter(out, WriterConfig(fps=spec.fps), overwrite=overwrite) as writer:
        for ep in tqdm(generate(tasks, episodes, seed_start, spec, workers), total=episodes,
                       desc='gen-demos', disable=not progress):
            counts[ep.task_name]['success' if ep.success else 'failure'] += 1
            if ep.success or not success_only:
                writer.add_episode(ep)
                frames += ep.length
    return {'out': str(out), 'episodes_written': sum(
        c['success'] for c in counts.values()) if success_only else episodes,
        'frames': frames, 'per_task': counts}
