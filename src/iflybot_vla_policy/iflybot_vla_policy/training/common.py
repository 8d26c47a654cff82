"""What every stage needs from a TrainConfig: its datasets, its model config, its folders."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset
from iflybot_vla_policy.training.config import TrainConfig

FINAL = 'final'     # sub-folder of output_dir with a stage's finished artefact


def open_datasets(cfg: TrainConfig) -> list[LeRobotDataset]:
    if not cfg.data.datasets:
        raise ValueError('data.datasets is empty: list at least one LeRobot dataset directory')
    return [LeRobotDataset(cfg.resolve(path)) for path in cfg.data.datasets]


def output_dir(cfg: TrainConfig) -> Path:
    return cfg.resolve(cfg.output_dir)


def model_config(cfg: TrainConfig) -> Any:
    from iflybot_vla_policy.config import get_config

    return get_config(cfg.model, cfg.model_overrides or None)


def dataclass_from_section(cls: type, values: dict[str, Any], section: str,
                           **defaults: Any) -> Any:
    """`cls(**defaults, **values)` where an unknown key fails naming '<section>.<key>'."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ValueError(f"unknown key '{section}.{key}'; valid keys: {sorted(names)}")
    return cls(**{**defaults, **values})
