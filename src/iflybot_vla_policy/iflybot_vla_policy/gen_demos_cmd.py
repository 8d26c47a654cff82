"""`iflybot gen-demos --task T --episodes N --out DIR`: scripted-expert demos from the simulator.

No ROS: the MuJoCo env and the scripted expert run in worker processes and the episodes are
written as a LeRobot v3.0 dataset, the same format `iflybot bag2dataset` produces.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--task', required=True,
                        help="task name, a comma-separated list (episodes alternate), or 'all'")
    parser.add_argument('--episodes', type=int, required=True, help='episodes to run')
    parser.add_argument('--out', required=True, help='dataset directory to create')
    parser.add_argument('--seed-start', type=int, default=0,
                        help='first simulator seed (training seeds only; episode k uses '
                             'seed-start + k)')
    parser.add_argument('--workers', type=int, default=0,
                        help='worker processes (0 = one per CPU core)')
    parser.add_argument('--fps', type=int, default=10, help='frames and actions per second')
    parser.add_argument('--image-size', type=int, nargs=2, default=(128, 128),
                        metavar=('H', 'W'), help='rendered camera size')
    parser.add_argument('--horizon', type=int, default=10, help='expert chunk length')
    parser.add_argument('--max-time', type=float, default=25.0,
                        help='sim seconds before an episode is cut off')
    parser.add_argument('--offset-start', type=float, nargs=2, default=None,
                        metavar=('MIN', 'MAX'),
                        help='pick tasks: start each episode with the open hand hovering MIN..MAX '
                             'm off the object to pick, so demos show the expert correcting a '
                             'missed approach (e.g. 0.02 0.06)')
    parser.add_argument('--keep-failures', action='store_true',
                        help='also write episodes the expert failed (success=false)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from iflybot_vla_policy.sim.tasks import TASKS
    from iflybot_vla_policy.training.sim_demos import DemoSpec, write_demos

    tasks = sorted(TASKS) if args.task == 'all' else [t.strip() for t in args.task.split(',')]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        print(f'iflybot gen-demos: unknown task(s) {unknown}; choose from {sorted(TASKS)} or all',
              file=sys.stderr)
        return 2
    if args.episodes < 1:
        print('iflybot gen-demos: --episodes must be >= 1', file=sys.stderr)
        return 2
    workers = args.workers or os.cpu_count() or 1
    if args.offset_start is not None:
        lo, hi = args.offset_start
        picks = {'pick_place', 'stack'}
        if not 0.0 <= lo <= hi or set(tasks) - picks:
            print(f'iflybot gen-demos: --offset-start needs 0 <= MIN <= MAX and only tasks in '
                  f'{sorted(picks)}; got {args.offset_start} for {tasks}', file=sys.stderr)
            return 2
    spec = DemoSpec(fps=args.fps, image_size=tuple(args.image_size), horizon=args.horizon,
                    max_time=args.max_time,
                    offset_start=None if args.offset_start is None else tuple(args.offset_start))
    try:
        summary = write_demos(Path(args.out), tasks, args.episodes, args.seed_start, spec,
                              workers=min(workers, args.episodes),
                              success_only=not args.keep_failures, overwrite=args.overwrite,
                              progress=True)
    except (FileExistsError, ValueError) as exc:
        print(f'iflybot gen-demos: {exc}', file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
