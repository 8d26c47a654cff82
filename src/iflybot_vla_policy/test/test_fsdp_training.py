"""FSDP2 through accelerate on 2 CPU processes (gloo), small Qwen2.5-VL configuration: the
paper's accelerate config (config/train/accelerate_fsdp_paper.yaml: one FSDP unit per decoder
layer, vision block and DiT block, sharded checkpoints, weights loaded through the meta device)
with 2 CPU processes, activation checkpointing on, EMA on.

- the same losses as one process (no FSDP, no checkpointing) for the same global batch;
- a sharded checkpoint (one torch.distributed.checkpoint shard per process) that a fresh pair
  of processes resumes from, the losses continuing as in the uninterrupted run;
- the exported policy, gathered from the shards, loads with `Policy.from_checkpoint` and holds
  the one-process run's EMA weights.

accelerate 1.15 runs FSDP only on GPU-like process groups; fsdp_vla.py says what it changes
for CPU. Two launches of ~15 s each on 2 cores.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_vla  # noqa: E402
from _vla_fixtures import (
    fresh_accelerator_state,  # noqa: E402, F401 (autouse)
    observation,  # noqa: E402
)
from conftest import REPO_ROOT  # noqa: E402
from iflybot_vla_policy.policy import Policy  # noqa: E402
from iflybot_vla_policy.training.trainer import list_checkpoints  # noqa: E402

PAPER_ACCELERATE = REPO_ROOT / 'config' / 'train' / 'accelerate_fsdp_paper.yaml'
STEPS = 4


def _cpu_config(tmp_path: Path) -> Path:
    """The paper's accelerate config with 2 CPU processes in fp32 (exact comparisons)."""
    cfg = yaml.safe_load(PAPER_ACCELERATE.read_text())
    assert cfg['distributed_type'] == 'FSDP' and cfg['fsdp_config']['fsdp_version'] == 2
    cfg.update(num_processes=2, use_cpu=True, mixed_precision='no',
               main_process_port=29600 + os.getpid() % 300)
    path = tmp_path / 'accelerate_cpu_fsdp.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, out: Path, per_run: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1')
    run = subprocess.run(
        [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', str(config),
         str(Path(fsdp_vla.__file__)), str(out), str(STEPS), str(per_run), '1'],
        env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    done = [json.loads(p.read_text()) for p in out.glob('losses_*.json')]
    return max(done, key=lambda info: info['resumed_from'])


def test_fsdp2_on_two_gloo_processes_matches_one_process_resumes_and_exports(tmp_path):
    trainer, one = fsdp_vla.train(tmp_path / 'one', fsdp_vla.trainer_config(STEPS))
    reference = [row['loss'] for row in one.history]
    live = {k: v.detach().clone() for k, v in trainer.unwrapped().vla.state_dict().items()}

    config = _cpu_config(tmp_path)
    out = tmp_path / 'fsdp'
    first = _launch(config, out, per_run=STEPS // 2)
    assert (first['world'], first['fsdp2'], first['sharded_params']) == (2, True, 'DTensor')
    assert first['resumed_from'] == 0
    # sharded checkpoint: one distributed-checkpoint file per process, no full weights file
    ckpt = list_checkpoints(out)[-1]
    assert ckpt.name.endswith(f'{STEPS // 2:07d}')
    for part in ('pytorch_model_fsdp_0', 'optimizer_0'):
        assert len(list((ckpt / part).glob('*.distcp'))) == 2, part
    assert not list(ckpt.glob('*.safetensors'))

    second = _launch(config, out, per_run=STEPS // 2)     # fresh processes resume
    assert second['resumed_from'] == STEPS // 2
    assert first['losses'] + second['losses'] == pytest.approx(reference, rel=1e-5)

    # the export, gathered from the shards, holds the one-process run's EMA weights
    policy = Policy.from_checkpoint(out / 'policy', warm_up=False)
    mine = policy.model.state_dict()
    theirs = Policy.from_checkpoint(tmp_path / 'one' / 'policy', warm_up=False).model.state_dict()
    assert mine.keys() == theirs.keys() == live.keys()
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=1e-4, atol=1e-4, msg=name)
    assert not all(torch.equal(mine[k], live[k]) for k in live), 'not the EMA weights'
    chunk = policy.infer(observation(policy.cfg, size=(56, 56)), seed=0)['actions']
    assert chunk.shape[0] == policy.cfg.action.horizon and np.isfinite(chunk).all()


def test_a_timing_run_writes_no_checkpoint_and_no_export(tmp_path):
    """trainer.checkpoint_at_end: false (the GPU timing script: the paper preset's sharded
    checkpoint with AdamW state would not fit a 64 GB disk) still logs every step."""
    cfg = dataclasses.replace(fsdp_vla.trainer_config(1), checkpoint_at_end=False)
    _, result = fsdp_vla.train(tmp_path, cfg)
    assert [row['step'] for row in result.history] == [1.0]
    assert not list_checkpoints(tmp_path) and not (tmp_path / 'policy').exists()
