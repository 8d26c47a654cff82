"""Dataset videos decoded once into memory at training resolution.

Random access into H.264 costs a seek and up to a GOP of decoding per frame; a whole dataset of
the tiny preset at 64-96 px fits in tens of MB, so every stage decodes each video sequentially
once and trains from RAM.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset

Resize = Callable[[np.ndarray], np.ndarray]   # (H, W, 3) uint8 -> (h, w, 3) uint8


def square_resize(size: int) -> Resize:
    """Bilinear resize to size x size (aspect not kept), what the LAM's frame pairs use."""
    from PIL import Image

    def resize(image: np.ndarray) -> np.ndarray:
        if image.shape[:2] == (size, size):
            return image
        return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return resize


def decode_camera(ds: LeRobotDataset, camera: str, resize: Resize,
                  episodes: list[int] | None = None, progress: bool = False) -> np.ndarray:
    """Every frame of `camera`, resized -> (num_frames, h, w, 3) uint8 in dataset frame order.

    Frames of episodes not in `episodes` stay zero.
    """
    from tqdm.auto import tqdm

    chosen = list(range(ds.num_episodes)) if episodes is None else list(episodes)
    out: np.ndarray | None = None
    for e in tqdm(chosen, desc=f'decode {camera}', disable=not progress, leave=False):
        start, stop = ds.episode_range(e)
        frames = ds.images(camera, list(range(start, stop)))     # (T, H, W, 3), sequential
        small = np.stack([resize(f) for f in frames])
        if out is None:
            out = np.zeros((ds.num_frames, *small.shape[1:]), dtype=np.uint8)
        out[start:stop] = small
    if out is None:
        raise ValueError(f'{ds.root}: no episodes to decode')
    ds.close()
    return out
