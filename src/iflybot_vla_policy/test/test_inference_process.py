"""The policy in a child process answers exactly as in process, and fails by name."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from iflybot_vla_policy.inference_process import InferenceProcess, PolicySpec, load_policy
from iflybot_vla_policy.robot import load_robot


def observations(count: int) -> list[dict]:
    rng = np.random.default_rng(3)
    state = np.append(load_robot().home, 0.04).astype(np.float32)
    return [{'images': {c: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                        for c in ('scene_camera', 'wrist_camera')},
             'state': state + np.float32(0.01 * k), 'instruction': f'pick up block {k}'}
            for k in range(count)]


def test_the_child_returns_the_chunks_of_the_same_policy_in_process_then_fails_by_name():
    spec = PolicySpec(preset='tiny', seed=5, noise_scale=1.0, torch_threads=1)
    local = load_policy(spec)
    child = InferenceProcess(spec)
    try:
        assert child.dt == local.dt and child.noise_scale == 1.0
        for obs in observations(3):   # the same noise, drawn in the same order
            ours, theirs = child.infer(obs), local.infer(obs)
            np.testing.assert_array_equal(ours['actions'], theirs['actions'])
        with pytest.raises(RuntimeError, match='inference failed in the inference process'):
            child.infer({'images': {}, 'state': np.zeros(8, np.float32), 'instruction': 'x'})
        np.testing.assert_array_equal(child.infer(observations(4)[3])['actions'],
                                      local.infer(observations(4)[3])['actions'])
        # Real-time chunking goes through: the executing chunk's frozen prefix comes back.
        previous = local.infer(observations(5)[4])['actions'][3:]
        child.infer(observations(5)[4])                    # the same noise draws on both sides
        ours = child.infer(observations(5)[4], previous=previous, inference_delay=2)
        theirs = local.infer(observations(5)[4], previous=previous, inference_delay=2)
        np.testing.assert_array_equal(ours['actions'][:2], previous[:2])
        np.testing.assert_allclose(ours['actions'], theirs['actions'], atol=1e-6)
        os.kill(child.pid, signal.SIGINT)    # Ctrl-C in the terminal: the parent decides
        np.testing.assert_array_equal(child.infer(observations(6)[5])['actions'],
                                      local.infer(observations(6)[5])['actions'])
        os.kill(child.pid, signal.SIGKILL)   # a dead child is named, not waited on forever
        with pytest.raises(RuntimeError, match='inference process'):
            child.infer(observations(1)[0])
    finally:
        child.close()


def test_a_checkpoint_the_child_cannot_load_is_named(tmp_path):
    with pytest.raises(RuntimeError, match='could not load the policy: FileNotFoundError'):
        InferenceProcess(PolicySpec(checkpoint=str(tmp_path / 'missing')))
