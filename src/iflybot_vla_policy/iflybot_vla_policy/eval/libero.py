"""LIBERO benchmark client: runs LIBERO task suites through `Policy.infer`, paper-style table.

LIBERO (and its robosuite/MuJoCo assets and initial states) is not on PyPI and cannot be
downloaded here; when it is installed locally this client runs the standard protocol: the
suite's fixed initial states, 10 settling steps with a no-op, 180-degree rotated 256x256 images,
an 8-dim state (end-effector position, axis-angle, two gripper joints), 7-dim end-effector delta
actions, re-planning every `replan_steps` actions, and the suite's step budget.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Step budgets per suite (the longest demonstration of each suite plus a margin).
MAX_STEPS: dict[str, int] = {'libero_spatial': 220, 'libero_object': 280, 'libero_goal': 300,
                             'libero_10': 520, 'libero_90': 400}
# The columns of the paper's LIBERO table, in order.
PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ('libero_spatial', 'Spatial'), ('libero_object', 'Object'), ('libero_goal', 'Goal'),
    ('libero_10', 'Long'))
NOOP_ACTION = np.array([0.0] * 6 + [-1.0], dtype=np.float64)
SETTLE_STEPS = 10


class LiberoUnavailable(RuntimeError):
    """LIBERO is not installed here; the message says what to install."""


def load_libero() -> Any:
    """Import LIBERO's benchmark module or explain how to get it."""
    try:
        from libero.libero import benchmark  # type: ignore[import-not-found]
    except ImportError as exc:
        raise LiberoUnavailable(
            'LIBERO is not installed: it is not on PyPI and its assets (robosuite scenes, BDDL '
            'files, initial states) cannot be downloaded by this tool. Install it locally from '
            'https://github.com/Lifelong-Robot-Learning/LIBERO (pip install -e LIBERO, plus '
            'robosuite==1.4), then re-run. '
            f'(import error: {exc})') from exc
    return benchmark


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """robosuite quaternion (x, y, z, w) -> axis-angle vector (3,), angle in [0, pi]."""
    q = np.asarray(quat_xyzw, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    den = math.sqrt(max(0.0, 1.0 - w * w))
    if den < 1e-10:
        return np.zeros(3)
    return q[:3] * (2.0 * math.acos(w)) / den


def observation_from_libero(raw: dict[str, np.ndarray], instruction: str) -> dict[str, Any]:
    """LIBERO's observation -> our observation dict (images rotated 180 degrees, 8-dim state)."""
    scene = np.ascontiguousarray(raw['agentview_image'][::-1, ::-1])
    wrist = np.ascontiguousarray(raw['robot0_eye_in_hand_image'][::-1, ::-1])
    state = np.concatenate([raw['robot0_eef_pos'], quat_to_axis_angle(raw['robot0_eef_quat']),
                            raw['robot0_gripper_qpos']]).astype(np.float32)
    return {'images': {'scene_camera': scene, 'wrist_camera': wrist}, 'state': state,
            'instruction': instruction}


@dataclass(frozen=True)
class SuiteResult:
    suite: str
    episodes: int
    successes: int

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else math.nan


def paper_table(results: Sequence[SuiteResult]) -> str:
    """Markdown in the paper's format: Spatial | Object | Goal | Long | Average (percent)."""
    by_suite = {r.suite: r for r in results}
    cells, rates = [], []
    for suite, _title in PAPER_COLUMNS:
        if suite in by_suite:
            rate = by_suite[suite].success_rate * 100
            rates.append(rate)
            cells.append(f'{rate:.1f}')
        else:
            cells.append('–')
    average = f'{np.mean(rates):.1f}' if len(rates) == len(PAPER_COLUMNS) else '–'
    header = '| Method | ' + ' | '.join(t for _s, t in PAPER_COLUMNS) + ' | Average |'
    rule = '|---' * (len(PAPER_COLUMNS) + 2) + '|'
    return '\n'.join([header, rule, f"| ours | {' | '.join(cells)} | {average} |"])


def run_suite(infer: Callable[[dict[str, Any]], dict[str, Any]], suite: str,
              trials_per_task: int = 50, replan_steps: int = 5, resolution: int = 256,
              seed: int = 7) -> SuiteResult:
    """Run every task of a suite `trials_per_task` times from its fixed initial states."""
    if suite not in MAX_STEPS:
        raise ValueError(f'unknown LIBERO suite {suite!r}; choose from {sorted(MAX_STEPS)}')
    benchmark = load_libero()
    import os

    from libero.libero import get_libero_path  # type: ignore[import-not-found]
    from libero.libero.envs import OffScreenRenderEnv  # type: ignore[import-not-found]

    task_suite = benchmark.get_benchmark_dict()[suite]()
    episodes = successes = 0
    for task_id in range(task_suite.n_tasks):
        task = task_suite.get_task(task_id)
        init_states = task_suite.get_task_init_states(task_id)
        bddl = os.path.join(get_libero_path('bddl_files'), task.problem_folder, task.bddl_file)
        env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=resolution,
                                 camera_widths=resolution)
        env.seed(seed)
        try:
            for trial in range(min(trials_per_task, len(init_states))):
                env.reset()
                raw = env.set_init_state(init_states[trial])
                for _ in range(SETTLE_STEPS):
                    raw, _r, _d, _i = env.step(NOOP_ACTION)
                done, steps = False, 0
                while not done and steps < MAX_STEPS[suite]:
                    actions = np.asarray(infer(observation_from_libero(raw, task.language))
                                         ['actions'], dtype=np.float64)
                    for action in actions[:replan_steps, :7]:
                        raw, _r, done, _i = env.step(action)
                        steps += 1
                        if done or steps >= MAX_STEPS[suite]:
                            break
                episodes += 1
                successes += int(done)
        finally:
            env.close()
    return SuiteResult(suite, episodes, successes)
