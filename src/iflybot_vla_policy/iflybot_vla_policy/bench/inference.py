"""Benchmark: chunk latency of the policy on CPU, eager path versus fast path, one thread.

Everything runs in one child process (so peak RSS is the policy's own, not the caller's); the
two paths of each shape run alternately, chunk by chunk, on the same observations, so they see
the same machine (these machines are shared: only side-by-side figures mean anything):
- `bundled`: the bundled checkpoint (`checkpoints/tiny_pick_place`: 128 px cameras, no latent
  tokens), through `Policy.infer` (preprocessing included); p50/p99 per chunk and per stage,
  process CPU time per chunk, the fast path's warm-up, and the largest difference between the
  two paths' actions (robot units);
- `tiny`: the preset (96 px, 8 latent tokens) the same way, plus the KV-reuse ratio (the
  cached prefix against recomputing it before every Euler step, eager) and the machine-
  independent cost of a chunk (GFLOP, aten op calls) of each path;
- `peer_shape_224` / `peer_shape_96`: the comparison point of the issue (LeRobot SmolVLA,
  7.3 M parameters, ~83 ms per chunk on this machine, ../shared/peers/smolvla/README.md): two
  224x224 cameras, a 50x7 chunk, 10 flow steps, batch 1, the cameras processed at 224 px (the
  fair comparison) and resized to the preset's 96 px.
`cpu_time_p50_ms` (process CPU time per chunk) is what a chunk costs regardless of contention.
"""
from __future__ import annotations

import json
import os
import sys
import time

from iflybot_vla_policy.bench import run_one_thread

PEER_SHAPE = {'action.horizon': 50, 'action.space': 'ee_delta', 'action.action_dim': 7,
              'flow.denoise_steps': 10}
BUNDLED = 'tiny_pick_place'
INSTRUCTIONS = ('pick up the red cube and place it in the blue bowl', 'open the drawer',
                'push the green cube to the left', 'stack the purple cube on the green cube')


def _observation(cfg, size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return {'images': {c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                       for c in cfg.cameras},
            'state': np.r_[rng.uniform(-0.5, 0.5, 7), 0.04].astype(np.float32),
            'instruction': INSTRUCTIONS[seed % len(INSTRUCTIONS)]}


def _stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(values)
    return {'p50_ms': round(float(np.percentile(arr, 50)), 2),
            'p99_ms': round(float(np.percentile(arr, 99)), 2),
            'mean_ms': round(float(arr.mean()), 2)}


def _side_by_side(paths: dict, obs: list, reps: int, baseline: bool = False) -> dict:
    """Alternate the policies in `paths` chunk by chunk; per path latency statistics, CPU time,
    stage medians; the speedup of 'fast' over 'eager' and their largest action difference."""
    import statistics

    import numpy as np

    for policy in paths.values():
        for i in range(3):
            policy.infer(obs[i % len(obs)])
    total = {k: [] for k in paths}
    cpu = {k: [] for k in paths}
    stages: dict = {k: {} for k in paths}
    recompute, diff = [], 0.0
    for i in range(reps):
        o = obs[i % len(obs)]
        actions = {}
        for name, policy in paths.items():
            c0 = time.process_time()
            out = policy.infer(o, seed=i)
            cpu[name].append((time.process_time() - c0) * 1e3)
            total[name].append(out['timing_ms']['total'])
            for k, v in out['timing_ms'].items():
                stages[name].setdefault(k, []).append(v)
            actions[name] = out['actions']
        diff = max(diff, float(np.abs(actions['fast'] - actions['eager']).max()))
        if baseline:
            recompute.append(paths['eager'].infer(o, seed=i, recompute_prefix_every_step=True)
                             ['timing_ms']['total'])
    result: dict = {}
    for name in paths:
        result[name] = {**_stats(total[name]),
                        'cpu_time_p50_ms': round(statistics.median(cpu[name]), 2),
                        'stages_p50_ms': {k: round(statistics.median(v), 2)
                                          for k, v in stages[name].items()}}
    result['speedup_p50'] = round(result['eager']['p50_ms'] / result['fast']['p50_ms'], 2)
    result['max_abs_action_diff'] = float(f'{diff:.3g}')
    result['warmup_s'] = round(paths['fast'].warmup_s or 0.0, 3)
    if baseline:
        result['recompute_prefix'] = _stats(recompute)
        result['kv_reuse_speedup'] = round(result['recompute_prefix']['p50_ms']
                                           / result['eager']['p50_ms'], 2)
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


def _pair(make) -> dict:
    """{'eager': ..., 'fast': ...} policies from make(eager=...)."""
    return {'eager': make(eager=True), 'fast': make(eager=False)}


def _child(quick: bool) -> dict:
    import resource

    import torch

    from iflybot_vla_policy.config import get_config
    from iflybot_vla_policy.paths import checkpoints_dir
    from iflybot_vla_policy.policy import Policy

    torch.set_num_threads(1)
    reps = 10 if quick else 60
    out: dict = {'reps': reps, 'threads': 1, 'torch_threads_available': os.cpu_count()}

    ckpt = checkpoints_dir() / BUNDLED
    if (ckpt / 'config.yaml').is_file():
        paths = _pair(lambda eager: Policy.from_checkpoint(ckpt, seed=0, eager=eager))
        source = f'checkpoints/{BUNDLED}'
    else:   # an install without the bundled weights: the same shapes, random weights
        cfg = get_config('tiny', {'image_size': 128, 'tokens.latent_tokens': 0})
        paths = _pair(lambda eager: Policy.from_config(cfg, seed=0, eager=eager))
        source = 'tiny preset at the checkpoint shape (random weights)'
    cfg = paths['fast'].cfg
    obs = [_observation(cfg, cfg.image_size, s) for s in range(4)]
    out['bundled'] = {'source': source, 'image_size': cfg.image_size,
                      'latent_tokens': cfg.tokens.latent_tokens,
                      'chunk': [cfg.action.horizon, cfg.robot_action_dim],
                      'denoise_steps': cfg.flow.denoise_steps,
                      **_side_by_side(paths, obs, reps)}
    del paths

    cfg = get_config('tiny')
    paths = _pair(lambda eager: Policy.from_config(cfg, seed=0, eager=eager))
    obs = [_observation(cfg, 224, s) for s in range(4)]
    out['tiny'] = {'parameters': paths['fast'].num_parameters(), 'image_size': cfg.image_size,
                   'latent_tokens': cfg.tokens.latent_tokens,
                   'chunk': [cfg.action.horizon, cfg.robot_action_dim],
                   'denoise_steps': cfg.flow.denoise_steps,
                   'cost_eager': _cost(paths['eager'], obs[0]),
                   'cost_fast': _cost(paths['fast'], obs[0]),
                   **_side_by_side(paths, obs, reps, baseline=True)}
    del paths

    for size in (224, 96):
        cfg = get_config('tiny', {**PEER_SHAPE, 'image_size': size})
        paths = _pair(lambda eager, cfg=cfg: Policy.from_config(cfg, seed=0, eager=eager))
        obs = [_observation(cfg, 224, s) for s in range(4)]
        out[f'peer_shape_{size}'] = {
            'parameters': paths['fast'].num_parameters(), 'camera_size': 224,
            'model_image_size': size, 'chunk': [cfg.action.horizon, cfg.robot_action_dim],
            'denoise_steps': cfg.flow.denoise_steps,
            'reference': 'LeRobot SmolVLA 7.28 M params: 83.1 ms/chunk, 1 thread '
                         '(2026-12-04, ../shared/peers/smolvla)',
            **_side_by_side(paths, obs, max(reps // 2, 5))}
        del paths
    out['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def run(quick: bool = True) -> dict:
    """Run the measurements in a fresh interpreter; returns the results dict."""
    return run_one_thread('iflybot_vla_policy.bench.inference', quick, 'inference')


if __name__ == '__main__':
    print(json.dumps(run(quick='--full' not in sys.argv), indent=1))
