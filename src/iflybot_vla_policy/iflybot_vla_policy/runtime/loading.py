"""Loading the policy the node runs: an injected factory (tests), a policy server, or a local
model in a child process or on a thread; then the warm-up inferences."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iflybot_vla_policy.robot import RobotSpec
from iflybot_vla_policy.runtime.config import NodeConfig

CHECKPOINT_CONFIG = 'config.yaml'   # the model config beside a checkpoint's weights (policy.py)


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Any        # infer(obs) -> {'actions': (horizon, dim), 'dt': s, ...}; maybe close()
    model_id: str
    chunk_dt: float    # s between actions, as the policy last reported it


def load_policy(cfg: NodeConfig, robot: RobotSpec, factory: Callable[[NodeConfig], Any] | None,
                warn: Callable[[str], None], chunk_dt: float = 0.1) -> LoadedPolicy:
    """Any failure raises (configure fails naming the parameter), except an unreachable policy
    server: the node holds until it answers."""
    if factory is not None:
        policy = factory(cfg)
        model_id = getattr(policy, 'model_id', type(policy).__name__)
    elif cfg.inference_backend == 'remote':
        from iflybot_vla_policy.remote import RemotePolicy
        policy = RemotePolicy(cfg.server_uri, api_key=cfg.api_key or None,
                              wire_format=cfg.wire_format)
        try:
            chunk_dt = float(policy.connect().get('dt', chunk_dt))
        except ConnectionError as exc:
            warn(f'policy server not reachable yet: {exc}')
        return LoadedPolicy(policy, cfg.server_uri, chunk_dt)
    else:
        from iflybot_vla_policy.inference_process import InferenceProcess, PolicySpec
        from iflybot_vla_policy.inference_process import load_policy as load_local

        spec = PolicySpec(checkpoint=cfg.checkpoint, preset=cfg.preset, seed=cfg.seed,
                          device=cfg.device, torch_threads=cfg.torch_threads,
                          noise_scale=cfg.noise_scale if cfg.noise_scale >= 0 else None)
        policy = InferenceProcess(spec) if cfg.inference_process else load_local(spec)
        model_id = cfg.checkpoint or f'{cfg.preset} (random weights)'
    if cfg.execution_strategy == 'rtc' and \
            'previous' not in inspect.signature(policy.infer).parameters:
        if hasattr(policy, 'close'):
            policy.close()
        raise ValueError(f"execution_strategy 'rtc' needs a policy whose infer takes previous= "
                         f'and inference_delay= (real-time chunking); {model_id} does not')
    if cfg.warmup_inferences:
        blank = blank_observation(cfg, robot, warmup_image_size(cfg))
    for _ in range(cfg.warmup_inferences):
        out = policy.infer(blank)
        chunk_dt = float(out.get('dt', chunk_dt))
    return LoadedPolicy(policy, model_id, chunk_dt)


def warmup_image_size(cfg: NodeConfig) -> tuple[int, int]:
    """(height, width) of the warm-up frames, so that warm-up resizes (or not) as the first
    camera frames will: the camera the checkpoint was trained on (its bundle.yaml, which the
    graphs render), else the model's square input size (checkpoint config, else the preset)."""
    from iflybot_vla_policy.bundle import bundle_info
    from iflybot_vla_policy.config import config_from_yaml, get_config

    camera = bundle_info(cfg.checkpoint or None).get('camera')
    if camera:
        return int(camera['height']), int(camera['width'])
    model_config = Path(cfg.checkpoint) / CHECKPOINT_CONFIG if cfg.checkpoint else None
    if model_config is not None and model_config.is_file():
        size = config_from_yaml(model_config.read_text()).image_size
    else:
        size = get_config(cfg.preset).image_size
    return size, size


def blank_observation(cfg: NodeConfig, robot: RobotSpec, size: tuple[int, int]) -> dict:
    """Black frames of `size` (height, width) and the robot at home, half open."""
    blank = np.zeros((*size, 3), dtype=np.uint8)
    state = np.append(robot.home, robot.gripper.max_width / 2)
    return {'images': {c: blank for c in cfg.camera_names},
            'state': state.astype(np.float32), 'instruction': 'warm up'}
