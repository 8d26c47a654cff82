"""`iflybot up GRAPH [key:=value ...]`: start a node graph of iflybot_bringup without ros2 launch.

The graph (src/iflybot_bringup/graphs/GRAPH.yaml) is the one `ros2 launch iflybot_bringup
GRAPH.launch.py` starts; the runner lives in iflybot_bringup and is imported inside run().
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('graph', help='graph name (sim, record, franka, gazebo, home) or a path '
                                      'to a graph YAML file')
    parser.add_argument('overrides', nargs='*', metavar='key:=value',
                        help='launch arguments, as for ros2 launch')
    parser.add_argument('--show-args', action='store_true',
                        help='list the arguments and nodes of the graph and exit')
    parser.add_argument('--dry-run', action='store_true',
                        help='print the command line of every node and exit')
    parser.add_argument('--sigint-timeout', type=float, default=3.0,
                        help='seconds between SIGINT and SIGTERM at shutdown')
    parser.add_argument('--sigterm-timeout', type=float, default=1.0,
                        help='seconds between SIGTERM and SIGKILL at shutdown')
    parser.add_argument('--lifecycle-timeout', type=float, default=180.0,
                        help='seconds for a lifecycle node to appear and configure')


def run(args: argparse.Namespace) -> int:
    try:
        from iflybot_bringup.runner import RunnerConfig, up
    except ImportError as exc:
        print(f'iflybot up: the iflybot_bringup package is not importable ({exc}); build the '
              f'workspace with `make setup` and `source env.sh`')
        return 2
    config = RunnerConfig(sigint_timeout=args.sigint_timeout,
                          sigterm_timeout=args.sigterm_timeout,
                          lifecycle_timeout=args.lifecycle_timeout)
    return up(args.graph, args.overrides, config=config, dry_run=args.dry_run,
              show_args=args.show_args)
