"""`iflybot eval`: closed-loop success, latency and smoothness on held-out simulation seeds."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TASKS = ('pick_place', 'stack', 'push', 'drawer')


# Lockstep renders one frame per chunk request: the policy node's inference_rate_hz
# (src/iflybot_bringup/config/policy.yaml), so every frame is answered.
LOCKSTEP_CAMERA_RATE_HZ = 5.0

DEFAULT_IMAGE_SIZE = 224    # rendered camera size when neither --image-size nor a bundle says


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', type=Path, help='policy checkpoint directory')
    source.add_argument('--preset', help='model preset with random weights (e.g. tiny): '
                                         'checks the harness, not a policy')
    source.add_argument('--expert', action='store_true',
                        help='the scripted expert as the policy (validates the harness)')
    parser.add_argument('--tasks', default='pick_place',
                        help=f'comma-separated tasks from {",".join(TASKS)}')
    parser.add_argument('--episodes', type=int, default=10, help='episodes per task')
    parser.add_argument('--out', type=Path, default=Path('outputs/eval'),
                        help='directory for report.json, report.md, plots and videos')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--direct', action='store_true',
                      help='(default) run the policy in-process against the MuJoCo simulation')
    mode.add_argument('--through-ros', action='store_true',
                      help='run the policy node against the sim node over DDS (iflybot up sim): '
                           'the deployment path, real time')
    parser.add_argument('--lockstep', action='store_true',
                        help='--through-ros: the simulator stops its clock at each camera frame '
                             "(rendered at the policy's 5 Hz request rate) until the policy "
                             'answers it, so results do not depend on how fast the machine is')
    parser.add_argument('--max-time', type=float, default=20.0,
                        help='simulated seconds per episode before it counts as failed')
    parser.add_argument('--policy-threads', type=int, default=None,
                        help='--through-ros: CPU threads of the policy node (default: the '
                             "graph's, 0 = one per core)")
    parser.add_argument('--replan-steps', type=int, default=0,
                        help='actions executed per chunk before re-planning (0: whole chunk)')
    parser.add_argument('--inference-delay', type=float, default=0.0, metavar='S',
                        help='direct mode: simulated seconds each inference takes; the previous '
                             "chunk's actions keep running meanwhile, as on a real robot")
    parser.add_argument('--chunking', choices=('naive', 'blend', 'rtc'), default='naive',
                        help="direct mode: how a new chunk joins the running one: 'naive' "
                             "switches to it, 'blend' mixes the old one out (the policy node's "
                             "output-level blend), 'rtc' is real-time chunking in the denoiser "
                             '(the delayed actions frozen, the overlap guided; docs/realtime.md)')
    parser.add_argument('--videos', type=int, default=1,
                        help='rollout videos per task (MP4 of the scene camera)')
    parser.add_argument('--image-size', type=int, default=None,
                        help='rendered (square) camera size; default: the size in the '
                             "checkpoint's bundle.yaml (what it was trained on), else "
                             f'{DEFAULT_IMAGE_SIZE}')
    parser.add_argument('--seed-offset', type=int, default=0,
                        help='start at this index into the held-out evaluation seeds')
    parser.add_argument('--seed', type=int, default=0, help='seed of the policy sampler')
    parser.add_argument('--noise-scale', type=float, default=None,
                        help="std of the policy's flow starting noise: 1 samples, 0 is "
                             "deterministic (less jitter); default: the checkpoint's "
                             'bundle.yaml inference.noise_scale, else 1')
    parser.add_argument('--expert-noise', type=float, default=0.0, metavar='RAD',
                        help='with --expert: Gaussian joint error (std, rad) added to its '
                             'chunks, to measure how precise a policy must be')
    parser.add_argument('--expert-noise-kind', choices=('offset', 'iid'), default='offset',
                        help="'offset': one error per chunk (a mislocalised target); 'iid': "
                             'one per action (jitter)')
    parser.add_argument('--instruction-variant', type=int, default=0, metavar='K',
                        help='direct mode: the same scenes with the instruction naming another '
                             'object (pick_place 1: the other cube; stack 1: the third cube on '
                             'the base, 2: on the third cube; push 1: the other zone; drawer 1: '
                             'the other drawer), to measure whether the instruction matters')



def camera_size(args: argparse.Namespace) -> int:
    """--image-size, else the camera a bundled checkpoint was trained on, else the default."""
    from iflybot_vla_policy.bundle import bundle_info

    if args.image_size is not None:
        return args.image_size
    camera = bundle_info(None if args.expert else args.checkpoint).get('camera')
    if not camera:
        return DEFAULT_IMAGE_SIZE
    if camera['width'] != camera['height']:
        raise SystemExit(f'iflybot eval: the bundle camera is {camera["width"]}x'
                         f'{camera["height"]}; give a square --image-size')
    return int(camera['width'])


def _noise_scale(args: argparse.Namespace) -> float | None:
    """--noise-scale, else the checkpoint's bundle default, else 1; None for the expert."""
    from iflybot_vla_policy.bundle import noise_scale

    return None if args.expert else noise_scale(args.checkpoint, args.noise_scale)


def _load_policy(args: argparse.Namespace):
    from iflybot_vla_policy.eval.rollout import ExpertPolicy

    if args.expert:
        if args.expert_noise:
            return (ExpertPolicy(noise=args.expert_noise, noise_kind=args.expert_noise_kind,
                                 seed=args.seed),
                    f'scripted expert + {args.expert_noise_kind} noise {args.expert_noise} rad')
        return ExpertPolicy(), 'scripted expert'
    if args.expert_noise:
        raise SystemExit('iflybot eval: --expert-noise perturbs the scripted expert; add --expert')
    from iflybot_vla_policy.policy import Policy

    if args.checkpoint is not None:
        if not args.checkpoint.is_dir():
            raise SystemExit(f'iflybot eval: checkpoint directory not found: {args.checkpoint}')
        return (Policy.from_checkpoint(args.checkpoint, seed=args.seed,
                                       noise_scale=_noise_scale(args)), str(args.checkpoint))
    return (Policy.from_config(args.preset, seed=args.seed, noise_scale=_noise_scale(args)),
            f'preset {args.preset} (random)')


def run(args: argparse.Namespace) -> int:
    from iflybot_vla_policy.eval.report import write_report
    from iflybot_vla_policy.eval.rollout import eval_seeds

    tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        print(f'iflybot eval: unknown task(s) {unknown}; choose from {list(TASKS)}',
              file=sys.stderr)
        return 2
    if args.episodes < 1:
        print('iflybot eval: --episodes must be at least 1', file=sys.stderr)
        return 2
    if args.instruction_variant:
        from iflybot_vla_policy.sim.tasks import TASKS as TASK_TYPES

        bad = [t for t in tasks if not 0 <= args.instruction_variant < TASK_TYPES[t].variants]
        if bad or args.through_ros:
            why = ('is a direct-mode option' if args.through_ros else
                   'is out of range for ' + ', '.join(
                       f'{t} (0..{TASK_TYPES[t].variants - 1})' for t in bad))
            print(f'iflybot eval: --instruction-variant {args.instruction_variant} {why}',
                  file=sys.stderr)
            return 2
    if args.through_ros and (args.inference_delay or args.chunking != 'naive'):
        print('iflybot eval: --inference-delay and --chunking are direct-mode options (through '
              "ROS the delay is the node's real one and the policy node picks the chunking)",
              file=sys.stderr)
        return 2
    if args.inference_delay < 0:
        print('iflybot eval: --inference-delay must be >= 0', file=sys.stderr)
        return 2
    if args.expert and args.chunking == 'rtc':
        print('iflybot eval: --chunking rtc guides a flow policy; the scripted expert has none',
              file=sys.stderr)
        return 2
    if args.checkpoint is not None:
        from iflybot_vla_policy.bundle import bundle_info

        try:
            bundle_info(args.checkpoint)
        except ValueError as exc:   # a typo in bundle.yaml: named, before any episode runs
            print(f'iflybot eval: {exc}', file=sys.stderr)
            return 2
    started = time.time()
    jobs = [(task, seed) for task in tasks for seed in eval_seeds(args.episodes, args.seed_offset)]
    args.out.mkdir(parents=True, exist_ok=True)
    error = ''
    if args.through_ros:
        episodes = []
        try:
            policy_name = _through_ros(args, jobs, episodes)
        except (RuntimeError, TimeoutError) as exc:   # the graph or a node died: named, no trace
            error = f'{exc} (node logs: {args.out / "graph.log"})'
            policy_name = through_ros_graph(args)[1]
        mode = 'through ROS (iflybot up sim)' + (', lockstep' if args.lockstep else '')
    else:
        episodes, policy_name = _direct(args, jobs)
        mode = 'direct'
    meta = {'policy': policy_name, 'mode': mode, 'tasks': ','.join(tasks),
            'episodes_per_task': args.episodes, 'max_time_s': args.max_time,
            'replan_steps': args.replan_steps, 'noise_scale': _noise_scale(args),
            'seeds': f'held-out EVAL_SEEDS from index {args.seed_offset}',
            'instruction_variant': args.instruction_variant,
            'inference_delay_s': args.inference_delay, 'chunking': args.chunking,
            'wall_time_s': round(time.time() - started, 1)}
    if error:
        meta['stopped_early'] = f'after {len(episodes)} of {len(jobs)} episodes: {error}'
        if not episodes:
            print(f'iflybot eval: error: {error}', file=sys.stderr)
            return 1
    doc = write_report(args.out, episodes, meta)
    for task, row in doc['tasks'].items():
        low, high = row['success_ci95']
        print(f'{task}: {row["successes"]}/{row["episodes"]} success '
              f'({row["success_rate"]:.0%}, 95% CI {low:.0%}-{high:.0%})')
    print(f'wrote {args.out / "report.json"} and {args.out / "report.md"}')
    if error:
        print(f'iflybot eval: error: {error}; stopped after {len(episodes)} of {len(jobs)} '
              f'episodes (the report holds those)', file=sys.stderr)
        return 1
    return 0


def through_ros_graph(args: argparse.Namespace) -> tuple[list[str], str]:
    """`iflybot up sim` arguments of a through-ROS eval, and the policy's name: the checkpoint
    (or preset) and the camera size the direct eval would render."""
    if args.checkpoint is not None:
        overrides, name = [f'checkpoint:={args.checkpoint.resolve()}'], str(args.checkpoint)
    else:
        overrides, name = [f'preset:={args.preset}'], f'preset {args.preset} (random)'
    size = camera_size(args)
    overrides += [f'image_width:={size}', f'image_height:={size}']
    if args.policy_threads is not None:
        overrides.append(f'policy_threads:={args.policy_threads}')
    if getattr(args, 'lockstep', False):
        overrides.append(f'camera_rate:={LOCKSTEP_CAMERA_RATE_HZ}')
    if args.noise_scale is not None:   # else the node takes the bundle's, as the direct eval
        overrides.append(f'noise_scale:={args.noise_scale}')
    return overrides, name


def _through_ros(args: argparse.Namespace, jobs: list[tuple[str, int]], episodes: list) -> str:
    """Run the jobs through ROS, appending each result to `episodes` as it ends (so that
    those survive an error later on); returns the policy's name."""
    from iflybot_vla_policy.eval.through_ros import run_episodes

    if args.expert:
        raise SystemExit('iflybot eval: --through-ros runs the policy node; use --checkpoint '
                         'or --preset (the expert through ROS is `iflybot record`)')
    overrides, name = through_ros_graph(args)

    def on_episode(result) -> None:
        episodes.append(result)
        print(f'{result.task} seed {result.seed}: {"success" if result.success else "failure"} '
              f'({result.duration_s:.1f} s)', flush=True)

    run_episodes(jobs, overrides, args.out, args.max_time, on_episode=on_episode,
                 lockstep=args.lockstep)
    return name


def _direct(args: argparse.Namespace, jobs: list[tuple[str, int]]):
    from tqdm import tqdm

    from iflybot_vla_policy.eval.report import write_video
    from iflybot_vla_policy.eval.rollout import RolloutConfig, run_episode
    from iflybot_vla_policy.robot import load_robot
    from iflybot_vla_policy.safety import SafetyFilter

    policy, policy_name = _load_policy(args)
    safety = SafetyFilter(load_robot())
    side = camera_size(args)
    size = (side, side)
    episodes = []
    videos_done: dict[str, int] = {}
    for task, seed in tqdm(jobs, desc='eval', unit='episode'):
        record = videos_done.get(task, 0) < args.videos
        frames = []
        config = RolloutConfig(max_time_s=args.max_time, replan_steps=args.replan_steps,
                               image_size=size, video=record,
                               instruction_variant=args.instruction_variant,
                               inference_delay_s=args.inference_delay,
                               chunking=args.chunking)
        result = run_episode(policy, task, seed, config, safety,
                             on_frame=frames.append if record else None)
        if record and frames:
            name = f'videos/{task}_{seed}.mp4'
            write_video(args.out / name, frames, fps=10)
            result.video = name
            videos_done[task] = videos_done.get(task, 0) + 1
        episodes.append(result)
        tqdm.write(f'{task} seed {seed}: {"success" if result.success else "failure"} '
                   f'({result.duration_s:.1f} s sim)')
    return episodes, policy_name
