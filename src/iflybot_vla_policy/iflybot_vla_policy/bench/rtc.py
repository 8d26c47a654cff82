"""Benchmark: what real-time chunking (rtc.py) costs per chunk, one CPU thread.

The bundled checkpoint through `Policy.infer`, plain and with RTC (the previous chunk's
remainder after 4 executed actions, 3 of them frozen, the exponential overlap guidance), on the
fast and the eager path, alternated chunk by chunk on the same observations in one child
process (a shared machine: only side-by-side figures mean anything). The guidance needs one
backward pass through the action expert per Euler step; the prefix is unchanged.
"""
from __future__ import annotations

import statistics
import time

from iflybot_vla_policy.bench import run_one_thread
from iflybot_vla_policy.bench.inference import BUNDLED, _observation, _stats

EXECUTED, DELAY = 4, 3   # actions of the previous chunk run before / during the inference


def _child(quick: bool) -> dict:
    import numpy as np
    import torch

    from iflybot_vla_policy.paths import checkpoints_dir
    from iflybot_vla_policy.policy import Policy

    torch.set_num_threads(1)
    ckpt = checkpoints_dir() / BUNDLED
    policies = {'fast': Policy.from_checkpoint(ckpt, seed=0),
                'eager': Policy.from_checkpoint(ckpt, seed=0, eager=True)}
    size = policies['fast'].cfg.image_size
    obs = [_observation(policies['fast'].cfg, size, s) for s in range(4)]
    previous = [policies['fast'].infer(o, seed=0)['actions'][EXECUTED:] for o in obs]
    reps = 10 if quick else 60
    total: dict = {}
    stages: dict = {}
    cpu: dict = {}
    for i in range(reps + 3):
        k = i % len(obs)
        for name, policy in policies.items():
            for mode in ('plain', 'rtc'):
                kw = {'previous': previous[k], 'inference_delay': DELAY} if mode == 'rtc' \
                    else {}
                c0 = time.process_time()
                out = policy.infer(obs[k], seed=i, **kw)
                if i < 3:        # warm-up
                    continue
                key = f'{name}_{mode}'
                cpu.setdefault(key, []).append((time.process_time() - c0) * 1e3)
                total.setdefault(key, []).append(out['timing_ms']['total'])
                for s, v in out['timing_ms'].items():
                    stages.setdefault(key, {}).setdefault(s, []).append(v)
                if mode == 'rtc':
                    assert np.array_equal(out['actions'][:DELAY], previous[k][:DELAY])
    result: dict = {'chunks': reps, 'previous_executed': EXECUTED, 'delay_actions': DELAY,
                    'source': f'checkpoints/{BUNDLED}'}
    for key in total:
        result[key] = {**_stats(total[key]),
                       'cpu_time_p50_ms': round(statistics.median(cpu[key]), 2),
                       'stages_p50_ms': {s: round(statistics.median(v), 2)
                                         for s, v in stages[key].items()}}
    for name in policies:
        result[f'{name}_rtc_over_plain_p50'] = round(
            result[f'{name}_rtc']['p50_ms'] / result[f'{name}_plain']['p50_ms'], 2)
    return result


def run(quick: bool = True) -> dict:
    """Run the measurements in a fresh interpreter at one thread; returns the results dict."""
    return run_one_thread('iflybot_vla_policy.bench.rtc', quick, 'rtc')


if __name__ == '__main__':
    import json

    print(json.dumps(run(quick=True), indent=2))
