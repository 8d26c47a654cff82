"""Plain-data types of the policy contract (numpy in, numpy out; no torch, no ROS)."""
from __future__ import annotations

from typing import TypedDict

import numpy as np


class Observation(TypedDict):
    """What `Policy.infer` takes.

    images: camera name -> uint8 (H, W, 3) RGB of any size ('scene_camera', 'wrist_camera');
    state: float (8,) = 7 FR3 joint positions (rad) + gripper opening width (m, 0..0.08);
    instruction: non-empty text.
    """

    images: dict[str, np.ndarray]
    state: np.ndarray
    instruction: str


class InferenceResult(TypedDict):
    """What `Policy.infer` returns.

    actions: float32 (horizon, 8) absolute joint targets + gripper width (joint mode) or
    (horizon, 7) TCP delta position, rotation vector, gripper width (ee_delta mode);
    dt: seconds between actions; latent_tokens: int64 (n_latent,) codes the VLM generated;
    timing_ms: per stage ('preprocess', 'prefix', 'latent', 'denoise', 'postprocess', 'total').
    """

    actions: np.ndarray
    dt: float
    latent_tokens: np.ndarray
    timing_ms: dict[str, float]
