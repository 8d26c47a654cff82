"""`iflybot demo` (`make demo`): the closed-loop demo through ROS in the MuJoCo simulation.

Starts the node graph with `iflybot up` (simulator + recorder, plus the policy when a checkpoint
is available), runs episodes across tasks, records each one to an MCAP bag, prints per-episode
success and latency, writes an MP4 of the rollouts and a plot of commanded vs measured joints.
Without a bundled checkpoint the scripted expert stands in for the policy, and the demo says so.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path

from iflybot_vla_policy.bundle import bundle_info, bundled_checkpoint, evaluation_summary

# push is not in the default: through ROS the expert cannot see the puck (no object-pose topic).
DEFAULT_TASKS = 'pick_place,stack,drawer,pick_place,stack'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', type=Path, default=None,
                        help='policy checkpoint (default: the bundled one under checkpoints/, '
                             'or the scripted expert when there is none)')
    parser.add_argument('--expert', action='store_true',
                        help='use the scripted expert even when a checkpoint is available')
    parser.add_argument('--tasks', default=None,
                        help='comma-separated task of each episode (one episode per entry; '
                             f'default: {DEFAULT_TASKS}, or the tasks a bundled policy was '
                             'trained on, from its bundle.yaml)')
    parser.add_argument('--first-seed', type=int, default=1_000_000,
                        help='seed of the first episode (held-out evaluation seeds)')
    parser.add_argument('--max-episode-s', type=float, default=25.0,
                        help='seconds before an episode is given up')
    parser.add_argument('--policy-threads', type=int, default=None,
                        help="CPU threads of the policy node (default: the sim graph's)")
    parser.add_argument('--out', type=Path, default=Path('outputs/demo'),
                        help='directory for bags, rollouts.mp4, joints.png and the log')


def plot_joints(path: Path, taps) -> None:
    """Commanded (trajectory points) vs measured (joint states) positions of the 7 joints."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(7, 1, figsize=(10, 12), sharex=True)
    mt, mq = np.asarray(taps.measured_t), np.asarray(taps.measured_q)
    ct, cq = np.asarray(taps.commanded_t), np.asarray(taps.commanded_q)
    for j, ax in enumerate(axes):
        if len(mt):
            ax.plot(mt, mq[:, j], color='#4c72b0', lw=1.2, label='measured')
        if len(ct):
            ax.plot(ct, cq[:, j], '.', color='#dd8452', ms=2.5, label='commanded')
        for start in taps.episode_starts:
            ax.axvline(start, color='0.7', lw=0.8, ls='--')
        ax.set_ylabel(f'q{j + 1} (rad)')
    axes[0].legend(loc='upper right', fontsize=8)
    axes[-1].set_xlabel('simulation time (s); dashed lines: episode resets')
    fig.suptitle('commanded vs measured FR3 joint positions')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from iflybot_vla_policy.eval.report import write_video
    from iflybot_vla_policy.eval.through_ros import start_graph, stop_graph
    from iflybot_vla_policy.ros import demo_driver

    checkpoint = None if args.expert else (args.checkpoint or bundled_checkpoint())
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        print(f'iflybot demo: checkpoint directory not found: {args.checkpoint}', file=sys.stderr)
        return 2
    try:
        bundle = bundle_info(checkpoint)
    except ValueError as exc:
        print(f'iflybot demo: {exc}', file=sys.stderr)
        return 2
    if args.tasks is None and bundle.get('tasks'):
        trained = list(bundle['tasks'])
        args.tasks = ','.join(trained[i % len(trained)] for i in range(5))
    tasks = [t.strip() for t in (args.tasks or DEFAULT_TASKS).split(',') if t.strip()]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    bags = out / 'bags'
    if checkpoint is None:
        print('iflybot demo: no bundled policy checkpoint yet (checkpoints/ is empty): the '
              'scripted expert stands in for the policy and drives the simulator through the '
              'same ROS command topics. Pass --checkpoint DIR to run a trained policy.')
        graph = ['record', 'expert:=false', f'output_dir:={bags}']
    else:
        print(f'iflybot demo: policy checkpoint {checkpoint}')
        if bundle.get('evaluation'):
            print('iflybot demo: its closed-loop success on held-out seeds (iflybot eval): '
                  f'{evaluation_summary(bundle)}')
        graph = ['sim', f'checkpoint:={checkpoint}', 'record:=true', f'output_dir:={bags}']
        if args.policy_threads is not None:
            graph.append(f'policy_threads:={args.policy_threads}')
        if bundle.get('camera'):     # render what the policy was trained on
            graph += [f'image_width:={bundle["camera"]["width"]}',
                      f'image_height:={bundle["camera"]["height"]}']
    print(f'iflybot demo: starting `iflybot up {" ".join(graph)}` (log: {out / "graph.log"})')
    proc = start_graph(graph[0], graph[1:], out / 'graph.log')
    demo_driver.init()
    driver = demo_driver.DemoDriver()
    executor, _thread = demo_driver.spin_in_background(driver)
    expert = session = None
    episodes = []
    rc = 0
    try:
        if checkpoint is None:
            from iflybot_vla_policy.ros.expert_teleop_node import ExpertSession

            session = ExpertSession(context_init=False, record=True, shutdown_when_done=False,
                                    max_episode_s=float(args.max_episode_s),
                                    operator_name='expert (demo)')
            expert = session.node
        for i, task in enumerate(tasks):
            seed = args.first_seed + i
            if proc.poll() is not None:
                raise RuntimeError(f'the node graph exited with code {proc.returncode}; '
                                   f'see {out / "graph.log"}')
            tic = time.monotonic()
            if expert is not None:
                expert.task = task
                driver.mark_episode_start()
                outcome = expert.run_episode(seed)
                episode = demo_driver.DemoEpisode(
                    task, seed, driver.last_instruction, outcome.success, outcome.sim_duration,
                    math.nan, outcome.episode_id, outcome.message)
            else:
                instruction = driver.reset(task, seed)
                bag = driver.start_episode(task, instruction, 'policy')
                success, duration, reason = driver.run_policy(instruction, args.max_episode_s)
                message = driver.stop_episode(success, f'demo, seed {seed}: {reason}')
                episode = demo_driver.DemoEpisode(task, seed, instruction, success, duration,
                                                  driver.latency_p50(), bag, message)
            episodes.append(episode)
            latency = ('n/a (scripted expert)' if math.isnan(episode.latency_p50_ms)
                       else f'{episode.latency_p50_ms:.1f} ms')
            print(f'episode {i + 1}/{len(tasks)} {task:10s} seed {seed}: '
                  f'{"SUCCESS" if episode.success else "failure"}  '
                  f'{episode.duration_s:5.1f} s sim, {time.monotonic() - tic:5.1f} s wall, '
                  f'inference p50 {latency}', flush=True)
    except (RuntimeError, TimeoutError) as exc:   # a node or the graph died: named, no trace
        print(f'iflybot demo: error: {exc}; stopped after {len(episodes)} of {len(tasks)} '
              f'episodes (node logs: {out / "graph.log"})', file=sys.stderr)
        rc = 1
    finally:
        graph_rc = stop_graph(proc)
        taps = driver.taps
        if session is not None:
            session.close(shutdown=False)
        demo_driver.shutdown(driver, executor)
    if graph_rc not in (0, -signal.SIGINT, 130) and rc == 0:
        print(f'iflybot demo: the node graph exited with code {graph_rc}; see '
              f'{out / "graph.log"}', file=sys.stderr)
        rc = rc or 1
    if taps.frames:
        write_video(out / 'rollouts.mp4', taps.frames, fps=7.5)
        print(f'wrote {out / "rollouts.mp4"} ({len(taps.frames)} frames)')
    if taps.measured_t:
        plot_joints(out / 'joints.png', taps)
        print(f'wrote {out / "joints.png"}')
    wins = sum(e.success for e in episodes)
    print(f'iflybot demo: {wins}/{len(episodes)} episodes successful; bags in {bags}')
    return rc

