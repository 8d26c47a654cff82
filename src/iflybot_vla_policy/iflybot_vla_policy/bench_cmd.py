"""`iflybot bench`: run every benchmark module, write bench.json and bench.md."""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import pkgutil
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', type=Path, default=Path('outputs/bench'),
                        help='directory for bench.json and bench.md')
    parser.add_argument('--quick', action='store_true',
                        help='few repetitions: checks that every benchmark runs (used by tests)')
    parser.add_argument('--only', default='',
                        help='comma-separated benchmark modules to run (default: all), '
                             'e.g. inference,sim')
    parser.add_argument('--peer-shape', action='store_true',
                        help='only the inference benchmark, whose peer_shape section is the '
                             'reproducible workload for timing other stacks: two 224x224 '
                             'cameras, 50x7 chunk, 10 flow steps, batch 1, 1 and 2 threads')
    parser.add_argument('--duration', type=float, default=None, metavar='SECONDS',
                        help='wall seconds of the benchmarks that take one (soak: back-to-back '
                             'goals in the sim graph; default 1800, skipped by --quick without '
                             'it)')


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return {'python': platform.python_version(), 'platform': platform.platform(), 'cpu': cpu,
            'cores': os.cpu_count(), 'torch': torch.__version__,
            'cuda': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY', ''),
            'time_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}


def discover() -> list[str]:
    from iflybot_vla_policy import bench

    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.ispkg)


def flatten(data: Any, prefix: str = '') -> list[tuple[str, Any]]:
    """Nested dicts -> [('a.b.c', value)] for the markdown table."""
    if isinstance(data, dict):
        rows: list[tuple[str, Any]] = []
        for key, value in data.items():
            rows.extend(flatten(value, f'{prefix}.{key}' if prefix else str(key)))
        return rows
    return [(prefix, data)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return 'n/a'
        return f'{value:.4g}'
    if isinstance(value, list) and len(value) > 8:
        return f'[{len(value)} values]'
    return str(value)


def to_markdown(report: dict[str, Any]) -> str:
    lines = ['# iflybot bench', '', f"quick: {report['quick']}", '', '## Machine', '']
    lines += [f'- {k}: {v}' for k, v in report['machine'].items()]
    for name, result in report['results'].items():
        lines += ['', f'## {name}', '', '| metric | value |', '|---|---|']
        lines += [f'| {key} | {_fmt(value)} |' for key, value in flatten(result)]
    return '\n'.join(lines) + '\n'


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    names = discover()
    if args.peer_shape:
        names = ['inference']
    elif args.only:
        wanted = [n.strip() for n in args.only.split(',') if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f'iflybot bench: unknown benchmark(s) {unknown}; available: {names}',
                  file=sys.stderr)
            return 2
        names = wanted
    report: dict[str, Any] = {'quick': args.quick, 'machine': machine_info(), 'results': {}}
    failures = 0
    for name in names:
        module = importlib.import_module(f'iflybot_vla_policy.bench.{name}')
        kwargs: dict[str, Any] = {'quick': args.quick}
        if args.duration is not None and 'duration' in inspect.signature(module.run).parameters:
            kwargs['duration'] = args.duration
        print(f'[bench] {name} ...', flush=True)
        start = time.perf_counter()
        try:
            result = module.run(**kwargs)
        except Exception as exc:  # a broken benchmark is reported, the others still run
            traceback.print_exc()
            result = {'error': f'{type(exc).__name__}: {exc}'}
            failures += 1
        result = {**result, 'bench_wall_s': round(time.perf_counter() - start, 2)}
        report['results'][name] = result
        print(f'[bench] {name} done in {result["bench_wall_s"]} s', flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / 'bench.json').write_text(json.dumps(report, indent=2, default=float) + '\n')
    (args.out / 'bench.md').write_text(to_markdown(report))
    print(to_markdown(report))
    print(f'wrote {args.out / "bench.json"} and {args.out / "bench.md"}')
    return 1 if failures else 0
