"""`iflybot libero`: the LIBERO benchmark through Policy.infer (needs LIBERO installed locally)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', type=Path, required=True,
                        help='policy checkpoint trained for LIBERO (end-effector delta actions)')
    parser.add_argument('--suites', default='libero_spatial,libero_object,libero_goal,libero_10',
                        help='comma-separated LIBERO suites')
    parser.add_argument('--trials', type=int, default=50, help='trials per task')
    parser.add_argument('--replan-steps', type=int, default=5,
                        help='actions executed per inferred chunk')
    parser.add_argument('--out', type=Path, default=Path('outputs/libero'),
                        help='directory for libero.json and libero.md')


def run(args: argparse.Namespace) -> int:
    from iflybot_vla_policy.eval.libero import (
        LiberoUnavailable,
        load_libero,
        paper_table,
        run_suite,
    )

    try:
        load_libero()
    except LiberoUnavailable as exc:
        print(f'iflybot libero: {exc}', file=sys.stderr)
        return 2
    from iflybot_vla_policy.policy import Policy

    policy = Policy.from_checkpoint(args.checkpoint)
    results = [run_suite(policy.infer, suite.strip(), args.trials, args.replan_steps)
               for suite in args.suites.split(',') if suite.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    table = paper_table(results)
    (args.out / 'libero.md').write_text(table + '\n')
    (args.out / 'libero.json').write_text(json.dumps(
        [{'suite': r.suite, 'episodes': r.episodes, 'successes': r.successes,
          'success_rate': r.success_rate} for r in results], indent=2) + '\n')
    print(table)
    return 0
