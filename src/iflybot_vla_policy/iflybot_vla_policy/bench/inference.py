"""Benchmark: chunk latency of the policy on CPU, KV reuse versus recomputing the prefix.

Everything runs in one child process (so peak RSS is the policy's own, not the caller's):
- `tiny`: the preset through `Policy.infer` (preprocessing included), 1 and 2 threads; p50/p99
  per chunk and per stage; the same observations alternately with the cached KV (normal path)
  and with the prefix recomputed before every Euler step (naive baseline), ratio in one run;
- `peer_shape`: the comparison point of the issue (a LeRobot SmolVLA of 7.3 M parameters takes
  ~95 ms per chunk here): two 224x224 cameras, a 50x7 chunk, 10 flow steps, batch 1, 1 and 2
  threads, with the parameter count. The camera images are resized to the preset's own model
  resolution inside `infer`, as in deployment.
Wall-clock latency depends on what else runs on the machine (the load average is reported);
`cpu_time_p50_ms` (process CPU time per chunk) is what the chunk costs regardless of contention
(with 1 thread it is the latency of an otherwise idle core).
"""
from __future__ import annotations

import json
import os
import sys
import time

from iflybot_vla_policy.bench import run_child

PEER_SHAPE = {'action.horizon': 50, 'action.space': 'ee_delta', 'action.action_dim': 7,
              'flow.denoise_steps': 10}


def _observation(cfg, size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return {'images': {c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                       for c in cfg.cameras},
            'state': np.r_[rng.uniform(-0.5, 0.5, 7), 0.04].astype(np.float32),
            'instruction': 'pick up the red cube and place it in the blue bowl'}


def _stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(values)
    return {'p50_ms': round(float(np.percentile(arr, 50)), 2),
            'p99_ms': round(float(np.percentile(arr, 99)), 2),
            'mean_ms': round(float(arr.mean()), 2)}


def _measure(policy, obs: list, reps: int, baseline: bool) -> dict:
    import statistics

    cached, recompute, stages, cpu = [], [], {}, []
    for i in range(3):
        policy.infer(obs[i % len(obs)])
    for i in range(reps):
        o = obs[i % len(obs)]
        c0 = time.process_time()
        out = policy.infer(o, seed=i)
        cpu.append((time.process_time() - c0) * 1e3)
        cached.append(out['timing_ms']['total'])
        for k, v in out['timing_ms'].items():
            stages.setdefault(k, []).append(v)
        if baseline:
            recompute.append(policy.infer(o, seed=i, recompute_prefix_every_step=True)
                             ['timing_ms']['total'])
    result = {**_stats(cached), 'cpu_time_p50_ms': round(statistics.median(cpu), 2),
              'stages_p50_ms': {k: round(statistics.median(v), 2) for k, v in stages.items()}}
    if baseline:
        result['recompute_prefix'] = _stats(recompute)
        result['kv_reuse_speedup'] = round(result['recompute_prefix']['p50_ms']
                                           / result['p50_ms'], 2)
    return result


def _cost(policy, obs) -> dict:
    """Machine-independent cost of one chunk: GFLOP (matmul/conv/attention) and aten op calls
    (on a small model, per-op overhead rather than arithmetic sets the CPU latency)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class _Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.calls += 1
            return func(*args, **(kwargs or {}))

    with FlopCounterMode(display=False) as flops:
        policy.infer(obs)
    with _Count():
        policy.infer(obs)
    return {'gflop_per_chunk': round(flops.get_total_flops() / 1e9, 3),
            'aten_ops_per_chunk': _Count.calls}


def _child(quick: bool) -> dict:
    import resource

    import torch

    from iflybot_vla_policy.config import get_config
    from iflybot_vla_policy.policy import Policy

    reps = 10 if quick else 50
    out: dict = {'reps': reps, 'torch_threads_available': os.cpu_count()}
    cfg = get_config('tiny')
    policy = Policy.from_config(cfg, seed=0)
    obs = [_observation(cfg, 224, s) for s in range(4)]
    out['tiny'] = {'parameters': policy.num_parameters(), 'image_size': cfg.image_size,
                   'chunk': [cfg.action.horizon, cfg.robot_action_dim],
                   'denoise_steps': cfg.flow.denoise_steps, **_cost(policy, obs[0])}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out['tiny'][f'threads_{threads}'] = _measure(policy, obs, reps, baseline=True)
    out['tiny']['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                       1)
    del policy
    peer_cfg = get_config('tiny', PEER_SHAPE)
    peer = Policy.from_config(peer_cfg, seed=0)
    out['peer_shape'] = {'parameters': peer.num_parameters(), 'camera_size': 224,
                         'chunk': [peer_cfg.action.horizon, peer_cfg.robot_action_dim],
                         'denoise_steps': peer_cfg.flow.denoise_steps,
                         'reference': 'LeRobot SmolVLA 7.3 M params: ~95 ms/chunk, 1 thread',
                         **_cost(peer, obs[0])}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out['peer_shape'][f'threads_{threads}'] = _measure(peer, obs, reps, baseline=False)
    out['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def run(quick: bool = True) -> dict:
    """Run the measurements in a fresh interpreter; returns the results dict."""
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
    env.pop('OMP_NUM_THREADS', None)  # threads are set per measurement
    result = run_child('iflybot_vla_policy.bench.inference', quick, env, 'inference')
    with open('/proc/loadavg') as f:
        result['load_average_1min'] = float(f.read().split()[0])
    return result


if __name__ == '__main__':
    print(json.dumps(run(quick='--full' not in sys.argv), indent=1))
