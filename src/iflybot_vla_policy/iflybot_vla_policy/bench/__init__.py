"""Benchmarks, one module per area; each exposes ``run(quick: bool) -> dict``.

Every figure is measured beside its naive baseline in the same run (these machines are noisy, so
ratios measured side by side are what we report). ``iflybot bench`` discovers the modules here,
runs them and writes one JSON file plus a markdown table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def run_child(module: str, quick: bool, env: dict[str, str], what: str,
              timeout: float = 3600) -> dict:
    """`module._child(quick)` in a fresh interpreter with `env` (own threads, allocator and peak
    RSS); returns the dict it printed on its RESULT line."""
    code = (f'import json; from {module} import _child; '
            f'print("RESULT " + json.dumps(_child({bool(quick)})))')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f'{what} benchmark failed:\n{proc.stderr[-4000:]}')
    line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith('RESULT '))
    return json.loads(line[len('RESULT '):])


def run_one_thread(module: str, quick: bool, what: str) -> dict:
    """`run_child` at one thread (passive OpenMP waits), with the machine's 1-min load average
    (a loaded machine explains slow figures)."""
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE', OMP_NUM_THREADS='1')
    result = run_child(module, quick, env, what)
    with open('/proc/loadavg') as f:
        result['load_average_1min'] = float(f.read().split()[0])
    return result
