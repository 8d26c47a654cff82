"""`iflybot sim`: run the simulator node, write task snapshots, or measure the scripted expert.

- `iflybot sim [--task T --seed S --real-time-factor F ...]` starts the ROS node `iflybot_sim`.
- `iflybot sim --snapshot DIR` writes DIR/<task>_<camera>.png for every task (no ROS needed).
- `iflybot sim --expert-eval N` runs the scripted expert on N seeds per task and prints the
  success rate (no ROS needed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TASK_NAMES = ('pick_place', 'stack', 'push', 'drawer')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--task', default=None, choices=TASK_NAMES,
                        help='node: task (default: the parameter, pick_place)')
    parser.add_argument('--seed', type=int, default=None,
                        help='scene seed (node default: the parameter; otherwise 0)')
    parser.add_argument('--real-time-factor', type=float, default=None,
                        help='node: 1 = real time, 0 = as fast as possible')
    parser.add_argument('--params-file', default=None,
                        help='node: a ROS parameter YAML (e.g. iflybot_bringup/config/sim.yaml)')
    parser.add_argument('--snapshot', metavar='DIR', default=None,
                        help='write a PNG per task and camera into DIR and exit')
    parser.add_argument('--image-size', type=int, nargs=2, default=(480, 640),
                        metavar=('H', 'W'), help='--snapshot image size')
    parser.add_argument('--expert-eval', type=int, metavar='N', default=0,
                        help='run the scripted expert on N seeds per task and report success')
    parser.add_argument('--tasks', nargs='+', default=list(TASK_NAMES), choices=TASK_NAMES,
                        help='tasks for --snapshot / --expert-eval')
    parser.add_argument('--mode', default='joint', choices=('joint', 'twist'),
                        help='--expert-eval: command joint chunks or Servo twists')
    parser.add_argument('--horizon', type=int, default=10,
                        help='--expert-eval: actions per chunk')
    parser.add_argument('--dt', type=float, default=0.05,
                        help='--expert-eval: seconds between actions (and twists)')
    parser.add_argument('--json', default=None, help='--expert-eval: also write results here')


def snapshot(directory: Path, tasks: list[str], seed: int, size: tuple[int, int]) -> list[Path]:
    """One PNG per task and camera, from the reset scene of `seed`."""
    from PIL import Image

    from iflybot_vla_policy.sim import make_env

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        with make_env(task, seed=seed, image_size=size) as env:
            for camera, image in env.render().items():
                path = directory / f'{task}_{camera}.png'
                Image.fromarray(image).save(path, optimize=True)
                written.append(path)
            print(f'{task}: "{env.instruction}"')
    return written


def expert_eval(tasks: list[str], episodes: int, seed: int, mode: str, horizon: int = 10,
                dt: float = 0.05) -> dict[str, dict]:
    """Success rate of the scripted expert per task over seeds seed .. seed + episodes - 1."""
    from iflybot_vla_policy.sim import make_env, run_expert_episode

    results = {}
    for task in tasks:
        env = make_env(task, seed=seed, render=False)
        failures, start = [], time.perf_counter()
        for s in range(seed, seed + episodes):
            env.reset(s)
            if not run_expert_episode(env, max_time=20.0, mode=mode, horizon=horizon, dt=dt):
                failures.append(s)
            done = s - seed + 1
            if done % 10 == 0 and done < episodes:
                print(f'{task}: {done - len(failures)}/{done} so far', flush=True)
        wall = time.perf_counter() - start
        rate = 1.0 - len(failures) / episodes
        results[task] = {'episodes': episodes, 'mode': mode, 'horizon': horizon, 'dt': dt,
                         'success_rate': rate, 'failed_seeds': failures,
                         'wall_s_per_episode': wall / episodes}
        print(f'{task}: {rate:.1%} of {episodes} ({mode}, horizon {horizon}, dt {dt}); '
              f'failed seeds {failures}; '
              f'{wall / episodes:.1f} s/episode', flush=True)
    return results


def run(args: argparse.Namespace) -> int:
    seed = 0 if args.seed is None else args.seed
    if args.snapshot:
        for path in snapshot(Path(args.snapshot), args.tasks, seed,
                             tuple(args.image_size)):
            print(path)
        return 0
    if args.expert_eval:
        results = expert_eval(args.tasks, args.expert_eval, seed, args.mode, args.horizon,
                              args.dt)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    from iflybot_vla_policy.ros import sim_node

    ros_args = ['--ros-args']
    if args.params_file:   # first, so that the options below override the file
        ros_args += ['--params-file', args.params_file]
    if args.task is not None:
        ros_args += ['-p', f'task:={args.task}']
    if args.seed is not None:
        ros_args += ['-p', f'seed:={args.seed}']
    if args.real_time_factor is not None:
        ros_args += ['-p', f'real_time_factor:={args.real_time_factor}']
    return sim_node.main([sys.argv[0], *ros_args])
