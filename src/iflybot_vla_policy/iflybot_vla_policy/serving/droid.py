"""openpi's DROID observation keys and action units, for running a pi0/pi0.5-DROID server.

Our own server (`iflybot serve`) takes our observation dict ({'images': {camera: HxWx3 uint8},
'state': 7 joint angles + gripper width in m, 'instruction'}) and answers absolute joint targets
plus a gripper width per step. An openpi server trained on DROID (a Franka Panda with a Robotiq
gripper) expects other keys and answers other units; `DroidFormat` converts both ways, so the
policy node can drive such a server (RemotePolicy(wire_format='droid')). The convention, as
openpi's examples/droid/main.py and DROID's RobotEnv use it:

request  'observation/exterior_image_1_left'  the scene camera, HxWx3 uint8 RGB (the server
                                              resizes; openpi's client pads to 224x224 first)
         'observation/wrist_image_left'       the wrist camera, same
         'observation/joint_position'         (7,) rad
         'observation/gripper_position'       (1,) 0 = open .. 1 = closed
         'prompt'                             the instruction
reply    'actions'  (H, 8): 7 normalised joint velocities, executed at 15 Hz, each step moving
                    the joints by v * 0.2 rad (the vector scaled down together when max|v| > 1,
                    DROID's max_joint_delta), and a gripper position, closed above 0.5.

The reply becomes our action chunk: joint targets integrated from the observed joint angles
(open loop over the chunk, as openpi's example executes it), the gripper fully closed or open,
and 'dt' = 1/15 s. What this cannot fix: a DROID policy has seen a Panda with a Robotiq gripper
and DROID's cameras, not an FR3 in our cell; expect to fine-tune.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from iflybot_vla_policy.robot import load_robot

SCENE_KEY = 'observation/exterior_image_1_left'
WRIST_KEY = 'observation/wrist_image_left'
JOINT_KEY = 'observation/joint_position'
GRIPPER_KEY = 'observation/gripper_position'
PROMPT_KEY = 'prompt'
DROID_JOINTS = 7        # DROID's arm, a Franka Panda: joint_position (7,), 7 velocities per step


def _gripper_max_width() -> float:
    return load_robot().gripper.max_width


@dataclass(frozen=True)
class DroidFormat:
    scene_camera: str = 'scene_camera'
    wrist_camera: str = 'wrist_camera'
    max_width: float = field(default_factory=_gripper_max_width)   # m, open (= DROID's 0)
    control_hz: float = 15.0         # DROID's control frequency
    max_joint_delta: float = 0.2     # rad per step at a normalised velocity of 1
    gripper_threshold: float = 0.5   # DROID positions above this close the gripper

    def request(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Our observation dict -> openpi's DROID request (images passed through unchanged)."""
        state = np.asarray(obs['state'], np.float64)          # joints + gripper width
        if state.shape != (DROID_JOINTS + 1,):
            raise ValueError(f'state must be {DROID_JOINTS} joint angles + gripper width, got '
                             f'{state.shape}')
        images = obs['images']
        closed = 1.0 - np.clip(state[DROID_JOINTS] / self.max_width, 0.0, 1.0)
        return {SCENE_KEY: np.asarray(images[self.scene_camera], np.uint8),
                WRIST_KEY: np.asarray(images[self.wrist_camera], np.uint8),
                JOINT_KEY: state[:DROID_JOINTS].copy(),
                GRIPPER_KEY: np.array([closed]),
                PROMPT_KEY: str(obs.get('instruction', ''))}

    def reply(self, out: dict[str, Any], obs: dict[str, Any]) -> dict[str, Any]:
        """openpi's DROID reply -> ours: 'actions' (H, 8) joint targets + width, 'dt'."""
        actions = np.asarray(out['actions'], np.float64)
        if actions.ndim != 2 or actions.shape[1] != DROID_JOINTS + 1:
            raise ValueError(f"DROID 'actions' must be (H, {DROID_JOINTS + 1}), got "
                             f'{actions.shape}')
        velocity = actions[:, :DROID_JOINTS]
        scale = np.maximum(1.0, np.abs(velocity).max(axis=1, keepdims=True))   # (H, 1)
        deltas = velocity / scale * self.max_joint_delta
        q0 = np.asarray(obs['state'], np.float64)[:DROID_JOINTS]
        targets = q0 + np.cumsum(deltas, axis=0)                              # (H, 7)
        width = np.where(actions[:, DROID_JOINTS] > self.gripper_threshold, 0.0,
                         self.max_width)
        result = {k: v for k, v in out.items() if k != 'actions'}
        result['actions'] = np.concatenate([targets, width[:, None]], axis=1).astype(np.float32)
        result['dt'] = 1.0 / self.control_hz
        return result
