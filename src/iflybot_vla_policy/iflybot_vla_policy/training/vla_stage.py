"""Stage `vla`: flow matching + latent CE + FAST CE on robot data, with spatial VQA mixed in.

Inputs: LeRobot datasets, the `lam` stage's model (latent targets) and the `fast` stage's
tokenizer (FAST targets); a model preset. Normalisation statistics come from the datasets. The
result, refreshed at every checkpoint, is `output_dir/policy`: a directory that
`Policy.from_checkpoint` loads (config.yaml, model.safetensors with the EMA weights when EMA is
on, norm_stats.json, tokenizer.json, fast/, lam/).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState

from iflybot_vla_policy.training.common import FINAL, model_config, open_datasets, output_dir
from iflybot_vla_policy.training.config import TrainConfig
from iflybot_vla_policy.training.grounding import episode_grounding
from iflybot_vla_policy.training.robot_data import (
    compute_norm_stats,
    norm_stats_close,
    robot_frames,
)
from iflybot_vla_policy.training.trainer import Trainer, list_checkpoints
from iflybot_vla_policy.training.vla_data import (
    MixedPlan,
    VLADataset,
    VQASamples,
    collate,
    latent_codes,
    model_images,
    robot_samples,
    vqa_samples,
)
from iflybot_vla_policy.transforms import NormStatsSet, Transforms

POLICY_DIR = 'policy'
LOSSES = ('flow', 'latent', 'fast', 'text', 'ground')
VQA_SEED_BASE = 90_000          # VQA scenes use training seeds away from gen-demos' defaults
VQA_PER_SCENE = 8


class VLAObjective(torch.nn.Module):
    """The VLA behind the trainer's protocol: a fixed set of loss names on every process
    (absent kinds report 0) and the knowledge-insulation switch as an argument."""

    def __init__(self, vla: torch.nn.Module) -> None:
        super().__init__()
        self.vla = vla

    def forward(self, batch: dict[str, torch.Tensor],
                knowledge_insulation: bool = False) -> dict[str, torch.Tensor]:
        cfg = self.vla.cfg
        if cfg.loss.knowledge_insulation != knowledge_insulation:
            self.vla.cfg = dataclasses.replace(cfg, loss=dataclasses.replace(
                cfg.loss, knowledge_insulation=knowledge_insulation))
        out = self.vla(batch)
        zero = out['total'].detach() * 0.0
        return {'loss': out['total'], **{k: out.get(k, zero).detach() for k in LOSSES}}

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.vla.set_activation_checkpointing(enabled)

    def tie_weights(self) -> None:
        """accelerate's FSDP2 loading with fsdp_cpu_ram_efficient_loading moves the model to
        the meta device, which unties the LM head from the embeddings (Qwen2.5-VL-3B ties them),
        and calls this to tie them again; untied they would train as two matrices."""
        self.vla.tie_weights()


def load_fast(cfg: TrainConfig, norm: NormStatsSet, vocab: int) -> Any:
    from iflybot_vla_policy.model.fast import FastTokenizer
    from iflybot_vla_policy.training.fast_stage import NORM_FILE

    if not cfg.fast_dir:
        raise ValueError("fast_dir is empty: run the fast stage and set fast_dir to its "
                         "output_dir (or set model_overrides 'tokens.fast_vocab: 0')")
    d = cfg.resolve(cfg.fast_dir) / FINAL
    fast = FastTokenizer.load(d)
    if fast.vocab_size > vocab:
        raise ValueError(f"{d}: FAST vocabulary {fast.vocab_size} exceeds the model's "
                         f'tokens.fast_vocab = {vocab}')
    if not norm_stats_close(norm, NormStatsSet.load(d / NORM_FILE)):
        raise ValueError(f'{d / NORM_FILE}: the FAST tokenizer was fitted with other '
                         'normalisation statistics than this stage computes (different '
                         'data.datasets or data.norm_mode?); refit it on the same data')
    return fast


def load_lam(cfg: TrainConfig, n_tokens: int, codebook: int) -> tuple[Any, str]:
    from iflybot_vla_policy.model.lam import WEIGHTS_FILE, LatentActionModel

    if not cfg.lam_dir:
        raise ValueError("lam_dir is empty: run the lam stage and set lam_dir to its "
                         "output_dir (or set model_overrides 'tokens.latent_tokens: 0')")
    d = cfg.resolve(cfg.lam_dir) / FINAL
    lam = LatentActionModel.load(d)
    c = lam.config
    if (c.n_tokens, c.codebook_size) != (n_tokens, codebook):
        raise ValueError(f'{d}: LAM has {c.n_tokens} tokens x {c.codebook_size} codes, the '
                         f'model expects {n_tokens} x {codebook} (tokens.latent_*)')
    stamp = (d / WEIGHTS_FILE).stat()
    return lam, f'{stamp.st_size}-{stamp.st_mtime_ns}'


def _vqa(cfg: TrainConfig, transforms: Transforms, tokenizer: Any, image_hw: tuple[int, int],
         cache: Path) -> VQASamples | None:
    """Render (or load from cache) the VQA scenes and tokenise their questions."""
    import pickle

    if cfg.data.vqa_ratio <= 0:
        return None
    seeds = list(range(VQA_SEED_BASE, VQA_SEED_BASE + cfg.data.vqa_scenes))
    path = cache / (f'vqa_{"-".join(cfg.data.vqa_tasks)}_{cfg.data.vqa_scenes}_'
                    f'{image_hw[0]}x{image_hw[1]}_{cfg.trainer.seed}.pkl')
    if path.is_file():
        scenes = pickle.loads(path.read_bytes())
    else:   # rendering needs MuJoCo; a machine without it runs from a carried cache
        from iflybot_vla_policy.data.vqa import render_scenes

        scenes = render_scenes(cfg.data.vqa_tasks, seeds, VQA_PER_SCENE, image_hw,
                               seed=cfg.trainer.seed)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
        tmp.write_bytes(pickle.dumps(scenes))
        tmp.replace(path)
    return vqa_samples(scenes, transforms, tokenizer)


def export_policy(trainer: Trainer, cfg_model: Any, tokenizer: Any, norm: NormStatsSet,
                  fast: Any, lam: Any, directory: Path) -> None:
    """Write a Policy checkpoint directory with the (EMA) weights, replacing the old one only
    once the new one is complete (call on every process: gathering is collective under FSDP)."""
    from iflybot_vla_policy.model.vla import VLA
    from iflybot_vla_policy.policy import Policy

    state = trainer.export_state_dict()
    if not trainer.is_main:
        return
    with torch.random.fork_rng(devices=[]):
        model = VLA(cfg_model, tokenizer)
    model.load_state_dict({k.removeprefix('vla.'): v for k, v in state.items()})
    tmp = directory.with_name(directory.name + '.tmp')
    if tmp.exists():
        shutil.rmtree(tmp)
    Policy(cfg_model, model.eval(), norm, fast=fast, lam=lam).save(tmp)
    old = directory.with_name(directory.name + '.old')
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def _warm_start(model: torch.nn.Module, policy_dir: Path) -> None:
    """Start from a Policy's weights; keys it lacks keep their fresh initialisation."""
    from iflybot_vla_policy.policy import WEIGHTS_FILE, load_weights

    if not (policy_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f'init_from: {policy_dir} is not a Policy directory (no '
                                f'{WEIGHTS_FILE})')
    fresh = load_weights(model, policy_dir / WEIGHTS_FILE, allow_missing=True)
    print(f'init_from {policy_dir}: {len(model.state_dict()) - len(fresh)} tensors loaded'
          + (f', {len(fresh)} new ({", ".join(sorted({k.split(".")[0] for k in fresh}))})'
             if fresh else ''), flush=True)


def run_vla(cfg: TrainConfig) -> dict[str, Any]:
    """Prepare the data, train (or resume), export `output_dir/policy`; returns a summary."""
    from iflybot_vla_policy.model.vla import VLA

    t0 = time.monotonic()
    out = output_dir(cfg)
    cache = out / 'cache'
    progress = cfg.trainer.progress
    mcfg = model_config(cfg)
    mcfg = dataclasses.replace(mcfg, loss=dataclasses.replace(
        mcfg.loss, knowledge_insulation=cfg.trainer.knowledge_insulation))
    datasets = open_datasets(cfg)
    frames = [robot_frames(ds, mcfg.action.horizon, cfg.data.success_only) for ds in datasets]
    norm = compute_norm_stats(frames, Transforms(mcfg), cfg.data.norm_mode)
    transforms = Transforms(mcfg, norm)
    fast = load_fast(cfg, norm, mcfg.tokens.fast_vocab) if mcfg.tokens.fast_vocab else None
    lam, lam_id = (load_lam(cfg, mcfg.tokens.latent_tokens, mcfg.tokens.latent_codebook)
                   if mcfg.tokens.latent_tokens else (None, ''))

    torch.manual_seed(cfg.trainer.seed)
    model = VLA(mcfg)
    tokenizer = model.tokenizer
    # the main process fills the caches first; the others then read them
    with PartialState(cpu=cfg.trainer.cpu or not torch.cuda.is_available()).main_process_first():
        images = [model_images(ds, mcfg.cameras, mcfg.image_size, cache, progress)
                  for ds in datasets]
        latents = [latent_codes(ds, lam, cfg.data.camera, cfg.data.frame_gap_s, cache, lam_id,
                                progress) if lam is not None else None for ds in datasets]
        cam_shape = datasets[0].features[f'observation.images.{mcfg.cameras[0]}']['shape']
        vqa = _vqa(cfg, transforms, tokenizer, (int(cam_shape[0]), int(cam_shape[1])), cache)
    groundings = ([episode_grounding(ds) for ds in datasets]
                  if mcfg.loss.grounding_weight > 0 else None)
    robot, robot_info = robot_samples(frames, transforms, tokenizer, images, latents, fast,
                                      cfg.data.max_fast_tokens, groundings)
    if groundings is not None and not robot_info['grounded_frames']:
        raise ValueError('loss.grounding_weight > 0 but no episode of data.datasets has a '
                         'simulator seed to rebuild its scene from (gen-demos datasets do)')
    data = VLADataset(robot, vqa)
    groups = ([np.nonzero(robot.task == k)[0] for k in range(len(robot.task_names))]
              if cfg.data.balance_tasks else None)
    plan = MixedPlan(data.n_robot, data.n_vqa, cfg.trainer.batch_size, cfg.data.vqa_ratio,
                     cfg.trainer.seed, groups)
    prep_s = time.monotonic() - t0

    def on_checkpoint(step: int, trainer: Trainer) -> None:
        export_policy(trainer, mcfg, tokenizer, norm, fast, lam, out / POLICY_DIR)

    if cfg.init_from and not list_checkpoints(out):
        _warm_start(model, cfg.resolve(cfg.init_from))
    trainer = Trainer(VLAObjective(model), data, cfg.trainer, out, collate_fn=collate,
                      plan=plan, on_checkpoint=on_checkpoint)
    result = trainer.fit()
    if cfg.trainer.checkpoint_at_end and not (out / POLICY_DIR).is_dir():
        on_checkpoint(result.steps, trainer)
    last = result.history[-1] if result.history else {}
    vqa_share = np.mean([plan.vqa_count(s) for s in range(min(cfg.trainer.steps, 1000))]) \
        / cfg.trainer.batch_size
    return {'stage': 'vla', 'steps': result.steps, 'resumed_from': result.resumed_from,
            'policy': str(out / POLICY_DIR), 'robot_samples': data.n_robot,
            'vqa_samples': data.n_vqa, 'vqa_share': float(vqa_share),
            'prepare_s': round(prep_s, 1), 'parameters': sum(p.numel()
                                                              for p in model.parameters()),
            **robot_info, **{k: last.get(k) for k in ('loss', *LOSSES)}}
