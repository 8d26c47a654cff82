"""Grounding targets rebuilt from gen-demos episodes: the named object and its destination."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset  # noqa: E402
from iflybot_vla_policy.sim.env import SimEnv  # noqa: E402
from iflybot_vla_policy.training.grounding import (  # noqa: E402
    GROUNDING_CENTER,
    GROUNDING_SCALE,
    episode_grounding,
    grasp_frame,
    normalise_points,
)
from training_toy import write_toy_dataset  # noqa: E402


def test_grasp_frame_is_the_first_closing_command():
    assert grasp_frame(np.array([0.08, 0.08, 0.079, 0.05, 0.0, 0.0])) == 3
    assert grasp_frame(np.array([0.08, 0.08, 0.08])) == 3          # never closes: all valid


def test_episode_targets_are_the_seeds_scene_until_the_gripper_closes(tmp_path):
    ds = LeRobotDataset(write_toy_dataset(tmp_path / 'toy', sim_instructions=True))
    g = episode_grounding(ds)
    assert g.known.all()
    for e in range(ds.num_episodes):
        with SimEnv('pick_place', seed=e, render=False) as env:
            env.reset(seed=e)
            np.testing.assert_allclose(g.points[e], env.task.grounding_points(env))
        start, stop = ds.episode_range(e)
        width = ds.episode_arrays(e)['action'][:, 7]
        closes = int(np.argmax(width < width[0] - 0.005))
        assert 0 < closes and g.valid_until[e] == start + closes
        frames = np.arange(start, stop)
        mask = g.frame_mask(np.full(len(frames), e), frames)
        assert mask[:closes].all() and not mask[closes:].any()


def test_targets_are_normalised_around_the_workspace_centre():
    p = np.array([[GROUNDING_CENTER, GROUNDING_CENTER + GROUNDING_SCALE]])
    np.testing.assert_allclose(normalise_points(p), [[[0, 0, 0], [1, 1, 1]]], atol=1e-6)
