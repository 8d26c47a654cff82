"""Instruction variants (Task.retarget): the same scene, an instruction naming another object,
and success judged against the object now named; what `iflybot eval --instruction-variant`
uses to measure whether a policy follows its instruction."""
from __future__ import annotations

import numpy as np
import pytest

from iflybot_vla_policy.sim import TASKS, TRAIN_SEEDS, make_env
from iflybot_vla_policy.sim.expert import run_expert_episode

CASES = [(task, k) for task in sorted(TASKS) for k in range(1, TASKS[task].variants)]


@pytest.mark.parametrize(('task', 'variant'), CASES)
def test_a_variant_is_the_same_picture_with_another_object_named(task: str,
                                                                 variant: int) -> None:
    seed = TRAIN_SEEDS[7]
    base = make_env(task, seed=seed, image_size=(48, 48))
    other = make_env(task, seed=seed, image_size=(48, 48), variant=variant)
    try:
        for camera, image in base.render().items():
            np.testing.assert_array_equal(other.render()[camera], image)
        assert other.instruction != base.instruction
        # exactly one word differs: the colour (or side) of what is named
        diff = [(a, b) for a, b in zip(base.instruction.split(), other.instruction.split(),
                                       strict=True) if a != b]
        assert len(diff) == 1, (base.instruction, other.instruction)
        assert not other.success()
    finally:
        base.close()
        other.close()


# After a variant's swap, this object is the one the drawn instruction named (it must stay
# untouched: only what the variant names is acted on).
FORMERLY_NAMED = {'pick_place': 'cube_b', 'stack': 'cube_c', 'push': 'zone_b',
                  'drawer': None}


@pytest.mark.parametrize(('task', 'variant'), CASES)
def test_the_expert_does_what_the_variant_names_and_leaves_the_drawn_target(
        task: str, variant: int) -> None:
    env = make_env(task, seed=TRAIN_SEEDS[11], render=False, variant=variant)
    try:
        before = {o.name: o.position for o in env.objects()}
        target = env.task.state.plan.get('drawer')
        assert run_expert_episode(env, max_time=20.0)
        after = {o.name: o.position for o in env.objects()}
        if task == 'drawer':
            other = 'drawer_right' if target == 'drawer_left' else 'drawer_left'
            assert env.task.opening(env, other) < 0.01
        elif task == 'push':
            assert np.linalg.norm(after['puck'][:2] - after['zone_b'][:2]) > 0.05
        else:
            name = FORMERLY_NAMED[task]
            assert np.linalg.norm(after[name][:2] - before[name][:2]) < 0.01
    finally:
        env.close()


def test_a_variant_out_of_range_is_refused_with_the_range() -> None:
    with pytest.raises(ValueError, match=r'variants 0\.\.1, got 2'):
        make_env('pick_place', seed=0, render=False, variant=2)
