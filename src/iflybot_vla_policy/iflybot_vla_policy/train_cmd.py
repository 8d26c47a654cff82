"""`iflybot train lam|fast|vla --config config/train/NAME.yaml`: run one training stage.

Multi-process / multi-GPU / multi-node runs go through accelerate, e.g.
`accelerate launch --config_file config/train/accelerate_ddp.yaml -m iflybot_vla_policy.cli
train vla --config config/train/tiny_vla.yaml`. A stage resumes from the newest checkpoint in
its output_dir unless --no-resume is given.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

STAGES = ('lam', 'fast', 'vla')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('stage', choices=STAGES, help='which stage to run')
    parser.add_argument('--config', required=True,
                        help='training YAML (config/train/*.yaml); its stage must match')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE',
                        help='override a config key, e.g. --set trainer.steps=100 (YAML value)')
    parser.add_argument('--output-dir', help='override output_dir')
    parser.add_argument('--no-resume', action='store_true',
                        help='start fresh even if output_dir has checkpoints')


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['trainer.steps=100', ...] -> {'trainer.steps': 100} (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f'--set expects KEY=VALUE, got {item!r}')
        out[key.strip()] = yaml.safe_load(value)
    return out


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = parse_overrides(args.overrides)
    if args.output_dir:
        out['output_dir'] = args.output_dir
    if args.no_resume:
        out['trainer.resume'] = False
    return out


def run(args: argparse.Namespace) -> int:
    import sys

    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')   # see notes: shared-core slowdowns
    # Huge pages for torch's large CPU buffers: without them half of a step's time went to page
    # faults (docs/training.md). Read at torch's first large allocation, which is still ahead.
    os.environ.setdefault('THP_MEM_ALLOC_ENABLE', '1')
    from iflybot_vla_policy.training.config import load_train_config

    try:
        cfg = load_train_config(args.config, _overrides(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f'iflybot train: {exc}', file=sys.stderr)
        return 2
    if cfg.stage != args.stage:
        print(f"iflybot train: {args.config} is a '{cfg.stage}' config, not '{args.stage}'",
              file=sys.stderr)
        return 2
    if args.stage == 'lam':
        from iflybot_vla_policy.training.lam_stage import run_lam as stage
    elif args.stage == 'fast':
        from iflybot_vla_policy.training.fast_stage import run_fast as stage
    else:
        from iflybot_vla_policy.training.vla_stage import run_vla as stage
    summary = stage(cfg)
    if int(os.environ.get('RANK', '0')) == 0:
        print(json.dumps(summary, indent=2, default=str))
    return 0
