"""Benchmark: one VLA training step on CPU with and without huge pages for torch's buffers.

The bundled policy's recipe (tiny preset, 128 px, flow + grounding, AdamW), one step =
forward, backward and optimiser update on a synthetic batch. Each setting runs in its own
interpreter with 2 threads, one after the other in the same run:
- `thp_off`: `THP_MEM_ALLOC_ENABLE=0`, torch's default: every large activation is fresh memory
  from the kernel, faulted in 4 KiB pages;
- `thp_on`: `THP_MEM_ALLOC_ENABLE=1` (what env.sh and `iflybot train` set): large buffers are
  madvised for transparent huge pages, 2 MiB per fault.
Reported: seconds per step (median), minor page faults per step, and the speed-up.
"""
from __future__ import annotations

import json
import os
import sys

from iflybot_vla_policy.bench import run_child

RECIPE = {'image_size': 128, 'tokens.fast_vocab': 0, 'loss.fast_weight': 0.0,
          'tokens.latent_tokens': 0, 'loss.latent_weight': 0.0, 'loss.grounding_weight': 1.0}
INSTRUCTION = 'pick up the red cube and place it in the blue bowl'


def _batch(model, batch: int) -> dict:
    import torch

    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    ids, mask = model.tokenizer.encode(INSTRUCTION, cfg.backbone.max_text_tokens)
    return {
        'images': torch.randint(0, 256, (batch, len(cfg.cameras), 3, cfg.image_size,
                                         cfg.image_size), generator=gen, dtype=torch.uint8),
        'text_ids': torch.tensor([ids] * batch),
        'text_mask': torch.tensor([mask] * batch),
        'state': torch.randn(batch, cfg.action.state_dim, generator=gen),
        'actions': torch.randn(batch, cfg.action.horizon, cfg.action.action_dim, generator=gen),
        'grounding': torch.rand(batch, 2, 3, generator=gen),     # (batch, points, xyz)
        'grounding_mask': torch.ones(batch, dtype=torch.bool),
    }


def _child(quick: bool) -> dict:
    import resource
    import statistics
    import time

    import torch

    from iflybot_vla_policy.config import get_config
    from iflybot_vla_policy.model.vla import VLA

    torch.manual_seed(0)
    model = VLA(get_config('tiny', RECIPE))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = _batch(model, 32)                       # the recipe's batch
    warm, steps = (1, 2) if quick else (2, 10)      # the first step allocates AdamW's state
    seconds: list[float] = []
    faults: list[int] = []
    for i in range(warm + steps):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        loss = model(batch)['total']
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if i >= warm:
            seconds.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {'batch': int(batch['state'].shape[0]), 'steps': steps,
            's_per_step': round(statistics.median(seconds), 3),
            'minor_faults_per_step': int(statistics.median(faults))}


def _run_child(quick: bool, thp: str) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE', OMP_NUM_THREADS='2',
               THP_MEM_ALLOC_ENABLE=thp)
    return run_child('iflybot_vla_policy.bench.training_step', quick, env, 'training-step',
                     timeout=1800)


def run(quick: bool = True) -> dict:
    off = _run_child(quick, '0')
    on = _run_child(quick, '1')
    with open('/proc/loadavg') as f:
        load = float(f.read().split()[0])
    return {'recipe': 'tiny preset, 128 px, flow + grounding, AdamW, 2 threads',
            'thp_off': off, 'thp_on': on,
            'thp_speedup': round(off['s_per_step'] / on['s_per_step'], 2),
            'fault_ratio': round(off['minor_faults_per_step']
                                 / max(on['minor_faults_per_step'], 1), 1),
            'load_average_1min': load}


if __name__ == '__main__':
    print(json.dumps(run(quick='--full' not in sys.argv), indent=1))
