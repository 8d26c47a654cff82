"""The `iflybot` command: one entry point with subcommands.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``.
Modules are imported only when their subcommand runs (or its --help is asked for), so
``iflybot --help`` stays fast and does not import torch or rclpy.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (name, module, one-line help). Keep sorted by workflow: check, simulate, data, train, run, eval.
COMMANDS: list[tuple[str, str, str]] = [
    ('doctor', 'iflybot_vla_policy.doctor',
     'check this machine: rclpy/RMW, interfaces, torch, MuJoCo rendering, ros2 launch, disk'),
    ('sim', 'iflybot_vla_policy.sim_cmd', 'MuJoCo FR3 sim node; --snapshot DIR; --expert-eval N'),
    ('demo', 'iflybot_vla_policy.demo_cmd',
     'closed-loop demo through ROS in the MuJoCo sim: episodes, bags, video, joint plot'),
    ('eval', 'iflybot_vla_policy.eval_cmd',
     'closed-loop evaluation on held-out sim seeds: success with 95% CI, latency, smoothness'),
    ('libero', 'iflybot_vla_policy.libero_cmd',
     'LIBERO benchmark suites through Policy.infer (LIBERO must be installed locally)'),
    ('bench', 'iflybot_vla_policy.bench_cmd',
     'run the benchmarks (each beside its naive baseline); JSON + markdown table'),
    ('serve', 'iflybot_vla_policy.serve_cmd', 'serve a policy to remote clients (openpi wire)'),
    ('up', 'iflybot_vla_policy.up_cmd', 'start a node graph (sim, record) without ros2 launch'),
    ('bag2dataset', 'iflybot_vla_policy.bag2dataset_cmd', 'bags -> LeRobot v3.0 dataset'),
    ('bag-repair', 'iflybot_vla_policy.bag_repair_cmd', 'recover bags cut off by a crash'),
    ('gen-demos', 'iflybot_vla_policy.gen_demos_cmd', 'expert demos from the sim -> dataset'),
    ('train', 'iflybot_vla_policy.train_cmd', 'train a stage: lam, fast or vla (accelerate)'),
    ('ablate', 'iflybot_vla_policy.ablate_cmd',
     "the paper's ablation: flow only, + FAST, + LAM, full; table with 95% CIs"),
    ('record', 'iflybot_vla_policy.record_cmd', 'record expert demos in the sim through ROS'),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='iflybot',
        description='iFlyBot-VLA on ROS 2: simulate, record, convert, train, serve and evaluate '
                    'a vision-language-action policy for the Franka FR3.',
        epilog="Run 'iflybot COMMAND --help' for the options of a command.")
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, _module, help_text in COMMANDS:
        # argparse %-formats help strings: a literal '95%' must reach it as '95%%'.
        sub.add_parser(name, help=help_text.replace('%', '%%'), add_help=False)
    return parser


def _command_parser(name: str, module_name: str, help_text: str) -> argparse.ArgumentParser:
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f'iflybot {name}', description=help_text,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ('-h', '--help'):
        top.print_help()
        return 0 if argv else 2
    for name, module_name, help_text in COMMANDS:
        if argv[0] == name:
            args = _command_parser(name, module_name, help_text).parse_args(argv[1:])
            try:
                return int(args._run(args) or 0)
            except KeyboardInterrupt:
                print(f'iflybot {name}: interrupted', file=sys.stderr)
                return 130
    top.error(f"unknown command '{argv[0]}' (choose from: "
              f"{', '.join(n for n, _, _ in COMMANDS)})")
    return 2


if __name__ == '__main__':
    sys.exit(main())
