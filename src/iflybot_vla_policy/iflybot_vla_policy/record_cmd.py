"""`iflybot record --episodes N --out DIR [--task T]`: unattended demos through ROS.

Starts the simulator node and the recorder node as processes, then runs the expert teleop node
in this process until N episodes are recorded: the same topics, services and bags as a
teleoperated session on the real robot. Prints one JSON line per episode and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--episodes', type=int, default=10, help='episodes to record')
    parser.add_argument('--out', type=Path, required=True, help='recording directory (bags)')
    parser.add_argument('--task', default='pick_place', help='simulator task')
    parser.add_argument('--first-seed', type=int, default=1000,
                        help='seed of the first episode (then +1 each)')
    parser.add_argument('--image-size', type=int, nargs=2, default=(224, 224),
                        metavar=('H', 'W'), help='camera image size')
    parser.add_argument('--camera-rate', type=float, default=15.0, help='camera rate in sim Hz')
    parser.add_argument('--real-time-factor', type=float, default=1.0,
                        help='simulator speed (sim s per wall s)')
    parser.add_argument('--max-episode-s', type=float, default=25.0,
                        help='sim seconds before an episode is given up')
    parser.add_argument('--compression', choices=('none', 'zstd'), default='none')
    parser.add_argument('--only-successful', action='store_true',
                        help='discard episodes the simulator judges failed')
    parser.add_argument('--isolated', action='store_true',
                        help='use a random ROS_DOMAIN_ID on localhost (no interference with '
                             'other ROS graphs on this network)')


def _spawn(module: str, params: dict[str, object], log: Path) -> subprocess.Popen:
    argv = [sys.executable, '-m', module, '--ros-args']
    for key, value in params.items():
        argv += ['-p', f'{key}:={value}']
    return subprocess.Popen(argv, stdout=log.open('w'), stderr=subprocess.STDOUT,
                            env=os.environ.copy())


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> int:
    if args.episodes < 1:
        print('iflybot record: error: --episodes must be >= 1', file=sys.stderr)
        return 2
    from iflybot_vla_policy.sim.tasks import EVAL_SEEDS

    seeds = range(args.first_seed, args.first_seed + args.episodes)
    if any(s in EVAL_SEEDS for s in (seeds[0], seeds[-1])) or \
            (seeds[0] < EVAL_SEEDS.start and seeds[-1] >= EVAL_SEEDS.stop):
        print(f'iflybot record: error: seeds {seeds.start}..{seeds.stop - 1} overlap the held-out '
              f'evaluation seeds {EVAL_SEEDS.start}..{EVAL_SEEDS.stop - 1}', file=sys.stderr)
        return 2
    if args.isolated:
        os.environ['ROS_DOMAIN_ID'] = str(random.randint(215, 232))   # Linux-safe, unused by tests
        os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / 'logs'
    logs.mkdir(exist_ok=True)
    height, width = args.image_size
    sim = _spawn('iflybot_vla_policy.ros.sim_node', {
        'task': args.task, 'seed': args.first_seed, 'image_height': height,
        'image_width': width, 'camera_rate': args.camera_rate,
        'real_time_factor': args.real_time_factor}, logs / 'sim.log')
    recorder = _spawn('iflybot_vla_policy.ros.recorder_node', {
        'output_dir': str(out), 'compression': args.compression}, logs / 'recorder.log')
    status = 0
    try:
        from iflybot_vla_policy.ros.expert_teleop_node import ExpertSession

        session = ExpertSession(task=args.task, episodes=args.episodes,
                                first_seed=args.first_seed,
                                max_episode_s=float(args.max_episode_s),
                                only_successful=bool(args.only_successful))
        node = session.node
        successes = 0
        started = time.monotonic()
        for i in range(args.episodes):
            for proc, name in ((sim, 'simulator'), (recorder, 'recorder')):
                if proc.poll() is not None:
                    raise RuntimeError(f'the {name} exited (code {proc.returncode}); see '
                                       f'{logs}/{"sim" if name == "simulator" else name}.log')
            outcome = node.run_episode(args.first_seed + i)
            successes += outcome.success
            print(json.dumps({'episode': i, 'seed': outcome.seed,
                              'episode_id': outcome.episode_id, 'success': outcome.success,
                              'sim_duration': round(outcome.sim_duration, 3),
                              'recorded': outcome.recorded, 'published': outcome.published,
                              'recorder': outcome.message}), flush=True)
        print(f'recorded {args.episodes} episode(s) of {args.task} to {out}: {successes} '
              f'successful, {time.monotonic() - started:.0f} s; convert with: iflybot '
              f'bag2dataset {out} --out DATASET --fps 15', file=sys.stderr)
        session.close(shutdown=False)
    except (RuntimeError, TimeoutError) as err:
        print(f'iflybot record: error: {err}', file=sys.stderr)
        status = 1
    finally:
        _stop(recorder)
        _stop(sim)
        from iflybot_vla_policy.ros.expert_teleop_node import shutdown_ros

        shutdown_ros()
    return status
