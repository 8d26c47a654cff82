"""`iflybot ablate --config config/train/tiny_vla.yaml --heldout DATASET`: the paper's ablation.

Trains each variant (flow only, + FAST, + latent actions, full with spatial VQA) from scratch on
the config's data for the same number of steps, scores it on held-out demonstrations and
optionally in closed loop, and writes ablation.json and ablation.md (a table with 95% CIs).
Variants resume from their checkpoints, so an interrupted ablation continues where it stopped.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from iflybot_vla_policy.training.ablation import DEFAULT_VARIANTS, VARIANTS

    parser.add_argument('--config', required=True,
                        help='vla-stage training YAML: data, model, batch, optimiser')
    parser.add_argument('--heldout', required=True, nargs='+',
                        help='held-out LeRobot dataset(s) for the offline score')
    parser.add_argument('--steps', type=int, default=300, help='training steps per variant')
    parser.add_argument('--variants', default=','.join(DEFAULT_VARIANTS),
                        help=f'comma-separated subset of {", ".join(VARIANTS)} (default: the '
                        "paper's four)")
    parser.add_argument('--out', type=Path, default=Path('outputs/ablation'),
                        help='one output_dir per variant, plus ablation.json/.md')
    parser.add_argument('--frame-stride', type=int, default=5,
                        help='score every k-th held-out frame')
    parser.add_argument('--episodes', type=int, default=0,
                        help='closed-loop episodes per task and variant (0 = offline only)')
    parser.add_argument('--tasks', default='pick_place', help='closed-loop tasks (comma list)')
    parser.add_argument('--image-size', type=int, default=128,
                        help='closed loop: rendered camera size (match the demos)')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE', help='override a key of --config (YAML value)')


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    from iflybot_vla_policy.train_cmd import parse_overrides
    from iflybot_vla_policy.training.ablation import AblationConfig, run_ablation
    from iflybot_vla_policy.training.config import load_train_config

    try:
        base = load_train_config(args.config, parse_overrides(args.overrides))
        cfg = AblationConfig(
            base=base, out=args.out, heldout=tuple(args.heldout),
            variants=tuple(v.strip() for v in args.variants.split(',') if v.strip()),
            steps=args.steps, frame_stride=args.frame_stride, episodes=args.episodes,
            tasks=tuple(t.strip() for t in args.tasks.split(',') if t.strip()),
            image_size=args.image_size)
    except (ValueError, FileNotFoundError) as exc:
        print(f'iflybot ablate: {exc}', file=sys.stderr)
        return 2
    run_ablation(cfg)
    print((args.out / 'ablation.md').read_text())
    print(f'wrote {args.out / "ablation.json"} and {args.out / "ablation.md"}')
    return 0
