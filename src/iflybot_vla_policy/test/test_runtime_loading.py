"""Policy loading's warm-up sees frames of the size the cameras will send, not a made-up one."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from iflybot_vla_policy.config import config_to_yaml, get_config
from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.runtime import parse_config
from iflybot_vla_policy.runtime.loading import load_policy, warmup_image_size

ROBOT = load_robot()


class Recorder:
    """Stand-in policy that keeps what warm-up gave it."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def infer(self, obs: dict) -> dict:
        self.seen.append(obs)
        return {'actions': np.zeros((4, ROBOT.n_joints + 1), np.float32), 'dt': 0.05}


def _checkpoint(tmp_path: Path, image_size: int, bundle: str | None) -> Path:
    (tmp_path / 'config.yaml').write_text(
        config_to_yaml(get_config('tiny', {'image_size': image_size})))
    if bundle is not None:
        (tmp_path / 'bundle.yaml').write_text(bundle)
    return tmp_path


def test_warm_up_frames_have_the_bundle_camera_size(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, 128, 'camera: {width: 160, height: 120}\n')
    cfg = parse_config({'checkpoint': str(ckpt), 'warmup_inferences': 2}, ROBOT)
    policy = Recorder()
    loaded = load_policy(cfg, ROBOT, lambda cfg: policy, warn=print)
    assert loaded.chunk_dt == 0.05
    assert len(policy.seen) == 2
    obs = policy.seen[0]
    assert sorted(obs['images']) == sorted(cfg.camera_names)
    assert {img.shape for img in obs['images'].values()} == {(120, 160, 3)}
    np.testing.assert_allclose(obs['state'][:ROBOT.n_joints], ROBOT.home, atol=1e-6)
    assert obs['state'].shape == (ROBOT.n_joints + 1,)


def test_without_a_bundle_camera_the_model_input_size_is_used(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, 64, 'tasks: [pick_place]\n')
    assert warmup_image_size(parse_config({'checkpoint': str(ckpt)}, ROBOT)) == (64, 64)
    tiny = get_config('tiny').image_size
    assert warmup_image_size(parse_config({'preset': 'tiny'}, ROBOT)) == (tiny, tiny)


def test_no_warm_up_inference_when_none_is_asked_for() -> None:
    policy = Recorder()
    load_policy(parse_config({'warmup_inferences': 0}, ROBOT), ROBOT, lambda cfg: policy,
                warn=print)
    assert policy.seen == []
