"""Model configuration: frozen dataclasses, named presets and validated dotted-key overrides.

`get_config('tiny')` / `get_config('paper')` give the built-in presets; any other name is looked
up as `config/model/NAME.yaml` (a `base:` preset plus `overrides:`), or given as a path to such a
file. Every knob is a named field, and an unknown or ill-typed key fails naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BACKBONE_KINDS = ('tiny', 'qwen2_5_vl', 'smolvlm')
ACTION_SPACES = ('joint', 'ee_delta')
DTYPES = ('float32', 'bfloat16', 'float16')
# Robot-side action width per action space (joint: 7 joints + gripper; ee: 6-D delta + gripper).
ACTION_SPACE_DIMS = {'joint': 8, 'ee_delta': 7}
ROBOT_STATE_DIM = 8  # 7 FR3 joint positions + gripper opening width


@dataclass(frozen=True)
class VisionConfig:
    """The tiny backbone's CPU-trainable conv tower (ignored by the transformers VLMs)."""

    channels: tuple[int, ...] = (32, 64, 128, 128)  # one stride-2 conv stage each
    token_grid: int = 6        # each camera's feature map pooled to grid x grid image tokens
    film: bool = True          # the instruction (small text encoder) FiLM-modulates each stage
    coord_channels: bool = True  # x/y coordinate planes appended to the input (CoordConv)


@dataclass(frozen=True)
class BackboneConfig:
    """The VLM: a tiny Qwen2 decoder fed by our conv tower, or a transformers VLM family."""

    kind: str = 'tiny'         # 'tiny' | 'qwen2_5_vl' | 'smolvlm'
    path: str = ''             # local directory with pretrained weights; '' = random init
    hidden: int = 256          # decoder width
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 512
    text_vocab: int = 1024     # text-token id capacity; latent and FAST token ids follow it
    max_text_tokens: int = 24  # instructions are padded/truncated to this many tokens
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    # vision tower of the transformers VLM families (random init when `path` is empty)
    vision_hidden: int = 1280
    vision_depth: int = 32
    vision_heads: int = 16
    vision_intermediate: int = 3420
    patch_size: int = 14
    spatial_merge: int = 2     # Qwen2.5-VL merge size / Idefics3 pixel-shuffle scale factor
    vision: VisionConfig = field(default_factory=VisionConfig)


@dataclass(frozen=True)
class ExpertConfig:
    """DiT action expert: one block per VLM layer, each cross-attending that layer's KV cache."""

    width: int = 128           # tiny: 4 heads of 32; the VLM's 64-wide KV heads are projected
    heads: int = 4
    mlp_ratio: float = 4.0
    direct_vision: bool = True  # also cross-attend the vision features (bypasses LM fusion)


@dataclass(frozen=True)
class ActionConfig:
    space: str = 'joint'       # 'joint' (absolute joint targets) | 'ee_delta' (TCP deltas)
    action_dim: int = 8        # model action width (robot actions zero-padded to it)
    state_dim: int = 8         # model state width (robot state zero-padded to it)
    horizon: int = 16          # actions per chunk
    dt: float = 0.1            # seconds between actions
    relative_joints: bool = True  # joint mode: the model predicts q_target - q_now (gripper abs)


@dataclass(frozen=True)
class FlowConfig:
    denoise_steps: int = 5     # Euler steps at inference
    beta_alpha: float = 1.5    # pi0 timestep sampling: t = t_min + (1 - t_min) * Beta(a, b)
    beta_beta: float = 1.0
    t_min: float = 0.001


@dataclass(frozen=True)
class TokenConfig:
    latent_tokens: int = 8     # latent-action tokens per chunk (0 disables them)
    latent_codebook: int = 32
    fast_vocab: int = 1024     # FAST BPE vocabulary size (0 disables FAST tokens)


@dataclass(frozen=True)
class LossConfig:
    flow_weight: float = 1.0
    latent_weight: float = 1.0
    fast_weight: float = 1.0
    text_weight: float = 1.0   # VQA answer tokens
    knowledge_insulation: bool = False  # detach the VLM KV (and vision features) the expert sees
    # > 0: a head on the vision summary regresses where the named object and its destination
    # are (sim ground truth), so the tower learns to localise what the instruction names
    grounding_weight: float = 0.0


@dataclass(frozen=True)
class VLAConfig:
    name: str = 'tiny'
    image_size: int = 96       # square model input; any camera size is resized/padded to it
    cameras: tuple[str, ...] = ('scene_camera', 'wrist_camera')
    dtype: str = 'float32'     # inference dtype
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    action: ActionConfig = field(default_factory=ActionConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    @property
    def robot_action_dim(self) -> int:
        return ACTION_SPACE_DIMS[self.action.space]

    @property
    def latent_offset(self) -> int:
        """Token id of latent code 0 (latent ids follow the text vocabulary)."""
        return self.backbone.text_vocab

    @property
    def fast_offset(self) -> int:
        """Token id of FAST token 0 (FAST ids follow the latent codes)."""
        return self.backbone.text_vocab + self.tokens.latent_codebook

    @property
    def vocab_size(self) -> int:
        return self.fast_offset + self.tokens.fast_vocab


def _tiny() -> VLAConfig:
    """CPU preset: ~11 M parameters, 96 px, 16-step chunks at 10 Hz (1.6 s) for the simulator."""
    return VLAConfig()


def _paper() -> VLAConfig:
    """arXiv 2511.01914: Qwen2.5-VL-3B, DiT 1024/16 with one block per layer, chunk 30, 20 dims."""
    return VLAConfig(
        name='paper', image_size=224, dtype='bfloat16',
        backbone=BackboneConfig(
            kind='qwen2_5_vl', hidden=2048, layers=36, heads=16, kv_heads=2, head_dim=128,
            intermediate=11008, text_vocab=151936, max_text_tokens=48, rope_theta=1e6,
            tie_embeddings=True, vision_hidden=1280, vision_depth=32, vision_heads=16,
            vision_intermediate=3420, patch_size=14, spatial_merge=2),
        expert=ExpertConfig(width=1024, heads=16, mlp_ratio=4.0, direct_vision=False),
        action=ActionConfig(space='joint', action_dim=20, state_dim=20, horizon=30, dt=1 / 30,
                            relative_joints=True),
        flow=FlowConfig(denoise_steps=5),
        tokens=TokenConfig(latent_tokens=8, latent_codebook=32, fast_vocab=2048),
        loss=LossConfig(knowledge_insulation=True))


PRESETS: dict[str, Callable[[], VLAConfig]] = {'tiny': _tiny, 'paper': _paper}


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, overrides, validation


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) suitable for YAML."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _flat_keys(cls: type, prefix: str = '') -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_flat_keys(tp, f'{prefix}{f.name}.'))
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else f'; valid keys: {valid}'
    return ValueError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check/convert one leaf value against its annotated type; errors name the key."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_coerce(f'{key}[{i}]', item_tp, v) for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f'unsupported annotation for {key}')
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}' must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f'unsupported annotation {tp} for {key}')


def _flatten(data: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """{'expert': {'width': 8}, 'flow.denoise_steps': 3} -> {'expert.width': 8, ...}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f'{prefix}{key}'
        if isinstance(value, Mapping):
            out.update(_flatten(value, full + '.'))
        else:
            out[full] = value
    return out


def _apply(cfg: Any, flat: Mapping[str, Any], prefix: str = '') -> Any:
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            sub = {k: v for k, v in flat.items() if k.startswith(key + '.')}
            if sub:
                changes[f.name] = _apply(getattr(cfg, f.name), sub, key + '.')
        elif key in flat:
            changes[f.name] = _coerce(key, tp, flat[key])
    return dataclasses.replace(cfg, **changes) if changes else cfg


def apply_overrides(cfg: VLAConfig, overrides: Mapping[str, Any] | None) -> VLAConfig:
    """Apply dotted-key (or nested) overrides; unknown keys fail with a did-you-mean hint."""
    if not overrides:
        return cfg
    flat = _flatten(overrides)
    valid = _flat_keys(VLAConfig)
    for key in flat:
        if key not in valid:
            raise _unknown(key, valid)
    return validate(_apply(cfg, flat))


def from_dict(data: Mapping[str, Any]) -> VLAConfig:
    """Full config from a nested dict (e.g. a checkpoint's config.yaml); strict about keys."""
    return apply_overrides(VLAConfig(), data) if data else validate(VLAConfig())


def validate(cfg: VLAConfig) -> VLAConfig:
    """Cross-field checks; each error names the offending key."""
    b, e, a = cfg.backbone, cfg.expert, cfg.action

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ValueError(f"config key '{key}': {why}")

    need(b.kind in BACKBONE_KINDS, 'backbone.kind', f'must be one of {BACKBONE_KINDS}')
    need(a.space in ACTION_SPACES, 'action.space', f'must be one of {ACTION_SPACES}')
    need(cfg.dtype in DTYPES, 'dtype', f'must be one of {DTYPES}')
    need(cfg.image_size >= 16, 'image_size', 'must be at least 16')
    need(len(cfg.cameras) >= 1 and len(set(cfg.cameras)) == len(cfg.cameras), 'cameras',
         'must name at least one camera, without duplicates')
    for key, value in (('backbone.hidden', b.hidden), ('backbone.layers', b.layers),
                       ('backbone.heads', b.heads), ('backbone.kv_heads', b.kv_heads),
                       ('backbone.head_dim', b.head_dim), ('backbone.text_vocab', b.text_vocab),
                       ('backbone.max_text_tokens', b.max_text_tokens),
                       ('expert.width', e.width), ('expert.heads', e.heads),
                       ('action.horizon', a.horizon), ('flow.denoise_steps',
                                                       cfg.flow.denoise_steps)):
        need(value > 0, key, f'must be positive, got {value}')
    need(b.heads % b.kv_heads == 0, 'backbone.kv_heads', 'must divide backbone.heads')
    need(e.width % e.heads == 0, 'expert.heads', 'must divide expert.width')
    need(e.heads % b.kv_heads == 0, 'expert.heads',
         f'must be a multiple of backbone.kv_heads ({b.kv_heads}) for grouped cross-attention')
    need(a.dt > 0, 'action.dt', 'must be positive')
    need(a.action_dim >= ACTION_SPACE_DIMS[a.space], 'action.action_dim',
         f'must be at least {ACTION_SPACE_DIMS[a.space]} for action space {a.space!r}')
    need(a.state_dim >= ROBOT_STATE_DIM, 'action.state_dim',
         f'must be at least {ROBOT_STATE_DIM} (7 joints + gripper)')
    need(0 <= cfg.flow.t_min < 1, 'flow.t_min', 'must be in [0, 1)')
    need(cfg.tokens.latent_tokens >= 0, 'tokens.latent_tokens', 'must be >= 0')
    need(cfg.tokens.latent_codebook > 0, 'tokens.latent_codebook', 'must be positive')
    need(cfg.tokens.fast_vocab >= 0, 'tokens.fast_vocab', 'must be >= 0')
    if b.kind == 'tiny':
        v = b.vision
        need(len(v.channels) >= 1 and all(c > 0 for c in v.channels), 'backbone.vision.channels',
             'must be a non-empty list of positive widths')
        need(v.token_grid > 0, 'backbone.vision.token_grid', 'must be positive')
        need(cfg.image_size // 2 ** len(v.channels) >= 1, 'image_size',
             f'too small for {len(v.channels)} stride-2 stages')
    if b.kind == 'qwen2_5_vl':
        unit = b.patch_size * b.spatial_merge
        need(cfg.image_size % unit == 0, 'image_size',
             f'must be a multiple of patch_size x spatial_merge = {unit} for Qwen2.5-VL')
    if b.kind == 'smolvlm':
        need(cfg.image_size % b.patch_size == 0, 'image_size', 'must divide by patch_size')
        need((cfg.image_size // b.patch_size) % b.spatial_merge == 0, 'backbone.spatial_merge',
             'must divide the patch grid side')
    return cfg


def load_yaml_config(path: Path) -> VLAConfig:
    """`base: <preset>` plus `overrides: {dotted or nested keys}`; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f'model config not found: {path}')
    data = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(data) - {'base', 'overrides', 'description'})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; valid: "
                         "['base', 'overrides', 'description']")
    base = data.get('base', 'tiny')
    if base not in PRESETS:
        raise ValueError(f"{path}: base '{base}' is not a preset {sorted(PRESETS)}")
    try:
        return apply_overrides(PRESETS[base](), data.get('overrides') or {})
    except ValueError as err:
        raise ValueError(f'{path}: {err}') from None


def get_config(name: str | Path = 'tiny',
               overrides: Mapping[str, Any] | None = None) -> VLAConfig:
    """Preset by name ('tiny', 'paper'), `config/model/NAME.yaml`, or a YAML path; then overrides.

    >>> get_config('tiny', {'flow.denoise_steps': 10}).flow.denoise_steps
    10
    """
    name_str = str(name)
    if name_str in PRESETS:
        cfg = validate(PRESETS[name_str]())
    elif name_str.endswith(('.yaml', '.yml')):
        cfg = load_yaml_config(Path(name_str))
    else:
        from iflybot_vla_policy.paths import config_dir
        path = config_dir() / 'model' / f'{name_str}.yaml'
        if not path.is_file():
            choices = sorted(PRESETS) + sorted(p.stem for p in path.parent.glob('*.yaml'))
            close = difflib.get_close_matches(name_str, choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise ValueError(f"unknown model config '{name_str}'{hint}; choices: {choices}")
        cfg = load_yaml_config(path)
    return apply_overrides(cfg, overrides)


def config_to_yaml(cfg: VLAConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_yaml(text: str) -> VLAConfig:
    return from_dict(yaml.safe_load(text) or {})
