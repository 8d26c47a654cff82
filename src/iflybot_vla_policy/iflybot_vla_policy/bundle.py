"""A checkpoint's bundle.yaml: what it was trained on and how it is meant to be run.

Optional beside the weights. `tasks` and `camera` tell the demo and eval what to render and ask
for; `evaluation` records its closed-loop figures; `inference` holds the settings it was
evaluated with (today `noise_scale`), so every entry point runs the policy the same way unless
told otherwise.
"""
from __future__ import annotations

from pathlib import Path

BUNDLE_FILE = 'bundle.yaml'
DEFAULT_NOISE_SCALE = 1.0
_KEYS = {'tasks', 'camera', 'evaluation', 'inference'}
_INFERENCE_KEYS = {'noise_scale'}


def bundle_info(checkpoint: str | Path | None) -> dict:
    """The validated bundle.yaml of `checkpoint`, or {} when there is none."""
    import yaml

    path = None if checkpoint is None else Path(checkpoint) / BUNDLE_FILE
    if path is None or not path.is_file():
        return {}
    info = yaml.safe_load(path.read_text()) or {}
    if not isinstance(info, dict):
        raise ValueError(f'{path}: expected a mapping')
    unknown = sorted(set(info) - _KEYS)
    if unknown:
        raise ValueError(f'{path}: unknown key(s) {unknown}; expected some of {sorted(_KEYS)}')
    camera = info.get('camera', {})
    if camera and not (isinstance(camera, dict) and set(camera) == {'width', 'height'}):
        raise ValueError(f'{path}: camera must be {{width: W, height: H}}, got {camera!r}')
    for task, result in (info.get('evaluation') or {}).items():
        if not (isinstance(result, dict) and isinstance(result.get('successes'), int)
                and isinstance(result.get('episodes'), int)
                and result['episodes'] > 0 and 0 <= result['successes'] <= result['episodes']):
            raise ValueError(f'{path}: evaluation.{task} must be {{successes: S, episodes: N}} '
                             f'with 0 <= S <= N, got {result!r}')
    inference = info.get('inference') or {}
    if not isinstance(inference, dict) or set(inference) - _INFERENCE_KEYS:
        raise ValueError(f'{path}: inference must be a mapping with keys from '
                         f'{sorted(_INFERENCE_KEYS)}, got {inference!r}')
    if 'noise_scale' in inference:
        scale = inference['noise_scale']
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 1:
            raise ValueError(f'{path}: inference.noise_scale must be a number in [0, 1], '
                             f'got {scale!r}')
    return info


def bundled_checkpoint() -> Path | None:
    """The first complete checkpoint (weights and config) under `checkpoints/`, if any."""
    from iflybot_vla_policy.paths import checkpoints_dir

    root = checkpoints_dir()
    if not root.is_dir():
        return None
    for candidate in sorted(root.iterdir()):
        if (candidate / 'model.safetensors').is_file() and (candidate / 'config.yaml').is_file():
            return candidate
    return None


def noise_scale(checkpoint: str | Path | None, requested: float | None = None) -> float:
    """`requested` if given, else the bundle's inference.noise_scale, else 1 (sampling)."""
    if requested is not None:
        return float(requested)
    scale = (bundle_info(checkpoint).get('inference') or {}).get('noise_scale')
    return DEFAULT_NOISE_SCALE if scale is None else float(scale)


def evaluation_summary(info: dict) -> str:
    """'pick_place 11/50 (22%)' from a bundle's `evaluation` (closed loop, `iflybot eval`)."""
    return ', '.join(f'{task} {r["successes"]}/{r["episodes"]} '
                     f'({100 * r["successes"] / r["episodes"]:.0f}%)'
                     for task, r in (info.get('evaluation') or {}).items())
