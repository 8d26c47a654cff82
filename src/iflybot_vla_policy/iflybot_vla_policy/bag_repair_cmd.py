"""`iflybot bag-repair BAG...`: recover bags cut off by a crash or damaged, and count the loss."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bags', nargs='+', type=Path, help='bag directories to repair')
    parser.add_argument('--keep-original', action='store_true',
                        help='keep the damaged bag as <BAG>.damaged')


def run(args: argparse.Namespace) -> int:
    from iflybot_vla_policy.data.bag_repair import repair_bag
    from iflybot_vla_policy.data.bags import BagError

    status = 0
    for bag in args.bags:
        try:
            report = repair_bag(bag, keep_original=args.keep_original)
        except BagError as err:
            print(f'iflybot bag-repair: error: {err}', file=sys.stderr)
            status = 1
            continue
        if not report.repaired:
            print(f'{bag}: intact ({report.message_count} messages), nothing to do')
            continue
        print(f'{bag}: {report.describe()}')
    return status
