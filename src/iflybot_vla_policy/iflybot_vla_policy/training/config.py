"""Training configuration: frozen dataclasses loaded from `config/train/*.yaml` with validation.

Every field is named and typed; a YAML file that misspells a key or gives a wrong type fails with
the dotted key (and a suggestion), never with a traceback deep inside training.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

STAGES = ('lam', 'fast', 'vla')


def _positive(obj: object, *names: str, prefix: str = 'trainer') -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ValueError(f'{prefix}.{name} must be > 0, got {value}')


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with cosine decay after a linear warm-up."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0          # max global gradient norm; 0 disables clipping
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1       # cosine floor as a fraction of lr


@dataclass(frozen=True)
class TrainerConfig:
    """Loop mechanics shared by every stage that optimises a torch model."""

    steps: int = 1000
    batch_size: int = 32            # global batch (all processes together)
    seed: int = 0
    optim: OptimConfig = OptimConfig()
    ema_decay: float = 0.0          # 0 disables the exponential moving average of weights
    checkpoint_every: int = 200     # steps between resumable checkpoints
    keep_checkpoints: int = 2       # newest N checkpoints kept on disk
    resume: bool = True             # continue from the newest checkpoint in output_dir if any
    num_workers: int = 0            # DataLoader worker processes per training process
    mixed_precision: Literal['no', 'bf16', 'fp16'] = 'no'
    cpu: bool = False               # force CPU even when an accelerator is present
    find_unused_parameters: bool = True   # DDP/FSDP: parts of the model may get no gradient
    # recompute every backbone and expert block in the backward instead of keeping its
    # activations (the model's set_activation_checkpointing): same losses and gradients, about
    # one more forward pass of compute, far less activation memory
    activation_checkpointing: bool = False
    knowledge_insulation: bool = False    # stop gradients from the action expert into the VLM
    progress: bool = True           # tqdm progress bar on the main process
    plot_every: int = 0             # steps between loss-curve PNGs; 0 = at checkpoints only
    max_steps_per_run: int = 0      # stop (with a checkpoint) after this many steps of this
                                    # invocation, to resume later; 0 = run to `steps`
    # checkpoint (and export) when a run stops; false for timing runs, whose state is not kept
    # (the paper preset's sharded checkpoint with AdamW state is ~75 GB on disk)
    checkpoint_at_end: bool = True

    def __post_init__(self) -> None:
        _positive(self, 'steps', 'batch_size', 'checkpoint_every', 'keep_checkpoints')
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f'trainer.ema_decay must be in [0, 1), got {self.ema_decay}')
        if min(self.num_workers, self.plot_every, self.max_steps_per_run) < 0:
            raise ValueError('trainer.num_workers, plot_every and max_steps_per_run must be >= 0')
        if self.optim.lr <= 0 or self.optim.warmup_steps < 0 or self.optim.grad_clip < 0:
            raise ValueError('trainer.optim: lr must be > 0, warmup_steps and grad_clip >= 0')
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ValueError('trainer.optim.min_lr_ratio must be in [0, 1]')


@dataclass(frozen=True)
class DataConfig:
    """Which demonstrations a stage reads, and how VLA batches are mixed."""

    datasets: tuple[str, ...] = ()  # LeRobot v3.0 dataset directories (relative to the repo root)
    frame_gap_s: float = 1.0        # lam: time between the two frames of a pair
    camera: str = 'scene_camera'    # lam: which video the frame pairs come from
    vqa_ratio: float = 0.07         # vla: share of spatial-VQA samples in every batch
    vqa_tasks: tuple[str, ...] = ('pick_place', 'stack', 'push', 'drawer')  # scenes for VQA
    vqa_scenes: int = 200           # vla: distinct sim scenes the VQA pool is generated from
    max_chunks: int = 20000         # fast: action chunks sampled to fit the tokenizer
    success_only: bool = True       # fast/vla: train on successful episodes only
    norm_mode: Literal['mean_std', 'quantile'] = 'quantile'   # state/action normalisation
    max_fast_tokens: int = 64       # vla: FAST sequences longer than this are truncated
    balance_tasks: bool = False     # vla: robot items take the episodes' tasks in turn

    def __post_init__(self) -> None:
        if not 0.0 <= self.vqa_ratio < 1.0:
            raise ValueError(f'data.vqa_ratio must be in [0, 1), got {self.vqa_ratio}')
        if self.frame_gap_s <= 0:
            raise ValueError(f'data.frame_gap_s must be > 0, got {self.frame_gap_s}')
        _positive(self, 'vqa_scenes', 'max_chunks', 'max_fast_tokens', prefix='data')


@dataclass(frozen=True)
class TrainConfig:
    """One training stage: what to train, on what data, and where outputs go."""

    stage: Literal['lam', 'fast', 'vla']
    output_dir: str                 # checkpoints, metrics.csv, loss.png, final artefacts
    model: str = 'tiny'             # model preset name (iflybot_vla_policy.config.get_config)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys of the preset
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = TrainerConfig()
    lam: dict[str, Any] = field(default_factory=dict)   # lam: LAMConfig fields (model/lam.py)
    fast: dict[str, Any] = field(default_factory=dict)  # fast: FastConfig fields (model/fast.py)
    lam_dir: str = ''               # vla: output_dir of the lam stage (its final/ is used)
    fast_dir: str = ''              # vla: output_dir of the fast stage
    # vla: a Policy directory whose weights start a fresh run (a warm start; modules the model
    # gained since, such as the grounding head, start fresh); ignored when resuming
    init_from: str = ''

    def resolve(self, path: str, base: Path | None = None) -> Path:
        """A path from this config, relative ones taken from `base` (the repo root by default)."""
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        if base is None:
            from iflybot_vla_policy.paths import repo_root
            base = repo_root() or Path.cwd()
        return base / p


def load_train_config(path: str | Path, overrides: Mapping[str, Any] | None = None
                      ) -> TrainConfig:
    """Read a training YAML; `overrides` are dotted keys ('trainer.steps': 10) applied on top."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'training config not found: {path}')
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f'{path}: top level must be a mapping, got {type(data).__name__}')
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    try:
        return from_mapping(TrainConfig, data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f'{path}: {exc}') from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split('.')
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def from_mapping(cls: type, data: Mapping[str, Any], prefix: str = '') -> Any:
    """Dataclass `cls` from a mapping, checking keys and types; errors name the dotted key."""
    if not isinstance(data, Mapping):
        raise ValueError(f"'{prefix or cls.__name__}' must be a mapping, got "
                         f'{type(data).__name__}')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ''
            raise ValueError(f"unknown key '{prefix}{key}'{hint}; valid keys: "
                             f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f'{prefix}{name}'
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"missing required key '{key}'")
            continue
        kwargs[name] = _coerce(hints[name], data[name], key)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f'{prefix}{exc}' if prefix and not str(exc).startswith(prefix)
                         else str(exc)) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value or {}, prefix=f'{key}.')
    if origin is Literal:
        if value not in args:
            raise ValueError(f"'{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"'{key}' must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f'{key}[{i}]') for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"'{key}' must have {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_coerce(a, v, f'{key}[{i}]') for i, (a, v) in pairs)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"'{key}' must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)   # YAML 1.1 reads '3e-4' as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"'{key}' must be a string, got {value!r}")
        return value
    return value
