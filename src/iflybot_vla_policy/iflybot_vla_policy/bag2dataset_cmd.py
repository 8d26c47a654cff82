"""`iflybot bag2dataset BAGS... --out DIR --fps N`: recorded episodes -> LeRobot v3.0 dataset."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bags', nargs='+', type=Path,
                        help='bag directories, or directories holding bags (a recording root)')
    parser.add_argument('--out', type=Path, required=True, help='dataset directory to create')
    parser.add_argument('--fps', type=int, default=30, help='frame rate of the dataset')
    parser.add_argument('--action-source', choices=('auto', 'command', 'next_state'),
                        default='auto',
                        help='actions from the commanded JointTrajectory/GripperCommand, from '
                             'the next state, or command when the bag has trajectories')
    parser.add_argument('--action-lead-frames', type=int, default=1,
                        help='the action at frame t is the target for frame t + this')
    parser.add_argument('--success-only', action='store_true',
                        help='skip episodes whose EpisodeInfo says success=false')
    parser.add_argument('--image-size', type=int, nargs=2, metavar=('H', 'W'),
                        help='resize camera frames (default: keep the camera size)')
    parser.add_argument('--camera', action='append', metavar='TOPIC=NAME',
                        help='image topic and camera name (repeatable; default: '
                             '/scene_camera/color/image_raw=scene_camera and the wrist camera)')
    parser.add_argument('--max-image-age', type=float, default=0.5, metavar='S',
                        help='a frame whose nearest image of some camera is further than this '
                             '(s) makes the episode fail (frames repeat the nearest image); 0: '
                             "the policy node's limit, 1.5 times the camera's period")
    parser.add_argument('--skip-bad', action='store_true',
                        help='skip unreadable or unconvertible bags instead of stopping')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def _cameras(specs: list[str] | None) -> dict[str, str] | None:
    if not specs:
        return None
    out = {}
    for spec in specs:
        topic, sep, name = spec.partition('=')
        if not sep or not topic.startswith('/') or not name:
            raise ValueError(f'--camera must be TOPIC=NAME (e.g. /cam/image_raw=scene_camera), '
                             f'got {spec!r}')
        out[topic] = name
    return out


def run(args: argparse.Namespace) -> int:
    from iflybot_vla_policy.data.bags import BagError
    from iflybot_vla_policy.data.convert import ConversionError, ConvertConfig, bags_to_dataset

    try:
        cameras = _cameras(args.camera)
        config = ConvertConfig(
            fps=args.fps, action_source=args.action_source,
            action_lead_frames=args.action_lead_frames, success_only=args.success_only,
            image_size=tuple(args.image_size) if args.image_size else None,
            max_image_age_s=args.max_image_age,
            **({'cameras': cameras} if cameras else {}))
        report = bags_to_dataset(args.bags, args.out, config, overwrite=args.overwrite,
                                 skip_bad=args.skip_bad, progress=not args.no_progress)
    except (BagError, ConversionError, ValueError, FileExistsError) as err:
        print(f'iflybot bag2dataset: error: {err}', file=sys.stderr)
        return 1
    for bag, reason in report.skipped:
        print(f'skipped {bag}: {reason}', file=sys.stderr)
    sources = ', '.join(f'{k}: {v}' for k, v in sorted(report.sources.items()))
    print(f'wrote {len(report.written)} episode(s), {report.frames} frames at {args.fps} fps '
          f'to {args.out} (actions from {sources})')
    return 0
