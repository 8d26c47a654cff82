"""RemotePolicy(wire_format='droid') against a server that expects openpi's DROID keys."""
from __future__ import annotations

import numpy as np
import pytest

from iflybot_vla_policy.remote import RemoteInferenceError, RemotePolicy
from iflybot_vla_policy.serving.background import ServerThread
from iflybot_vla_policy.serving.server import ServerConfig

DROID_KEYS = ('observation/exterior_image_1_left', 'observation/wrist_image_left',
              'observation/joint_position', 'observation/gripper_position', 'prompt')


class DroidServerPolicy:
    """Stands in for an openpi pi0.5-DROID policy: refuses other keys, answers DROID units."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def infer(self, obs: dict) -> dict:
        missing = [k for k in DROID_KEYS if k not in obs]
        if missing:
            raise KeyError(f'missing DROID keys {missing}')
        self.seen.append(obs)
        actions = np.zeros((4, 8), np.float32)
        actions[:, 0] = 0.5                    # 0.1 rad per step on joint 1
        actions[2, 1] = 3.0                    # max|v| > 1: the step is scaled down together
        actions[2, 0] = 1.5
        actions[:, 7] = [0.2, 0.4, 0.6, 0.9]   # open, open, closed, closed
        return {'actions': actions}


def observation() -> dict:
    rng = np.random.default_rng(0)
    return {'images': {c: rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
                       for c in ('scene_camera', 'wrist_camera')},
            'state': np.array([0.1, -0.7, 0, -2.3, 0, 1.6, 0.8, 0.02], np.float32),
            'instruction': 'put the red cube in the bowl'}


@pytest.fixture(scope='module')
def droid_server():
    policy = DroidServerPolicy()
    with ServerThread(policy, ServerConfig(port=0)) as server:
        yield server, policy


def test_droid_keys_and_units_are_mapped_both_ways(droid_server):
    server, policy = droid_server
    obs = observation()
    with RemotePolicy(server.uri, wire_format='droid') as remote:
        out = remote.infer(obs)
    sent = policy.seen[-1]
    np.testing.assert_array_equal(sent['observation/exterior_image_1_left'],
                                  obs['images']['scene_camera'])
    np.testing.assert_array_equal(sent['observation/wrist_image_left'],
                                  obs['images']['wrist_camera'])
    np.testing.assert_allclose(sent['observation/joint_position'], obs['state'][:7])
    np.testing.assert_allclose(sent['observation/gripper_position'], [0.75])   # 2 of 8 cm open
    assert sent['prompt'] == obs['instruction']
    actions = out['actions']
    assert actions.shape == (4, 8) and out['dt'] == pytest.approx(1 / 15)
    q0 = obs['state'][:7].astype(np.float64)
    np.testing.assert_allclose(actions[:, 0] - q0[0], [0.1, 0.2, 0.3, 0.4], atol=1e-6)
    np.testing.assert_allclose(actions[:, 1] - q0[1], [0, 0, 0.2, 0.2], atol=1e-6)
    np.testing.assert_allclose(actions[:, 7], [0.08, 0.08, 0.0, 0.0])


def test_our_keys_are_refused_by_a_droid_server(droid_server):
    server, _ = droid_server
    with RemotePolicy(server.uri) as remote, pytest.raises(RemoteInferenceError,
                                                           match='missing DROID keys'):
        remote.infer(observation())


def test_unknown_wire_format_is_refused():
    with pytest.raises(ValueError, match='wire_format'):
        RemotePolicy('ws://localhost:1', wire_format='aloha')
