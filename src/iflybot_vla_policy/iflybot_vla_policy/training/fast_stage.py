"""Stage `fast`: fit the FAST tokenizer (DCT + BPE) on normalised action chunks of the data.

The normalisation is the one the VLA stage and `Policy` use (statistics of the same datasets),
saved beside the tokenizer so the VLA stage can check it tokenises with the same statistics.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from iflybot_vla_policy.model.fast import FastConfig, FastTokenizer
from iflybot_vla_policy.training.common import (
    FINAL,
    dataclass_from_section,
    model_config,
    open_datasets,
    output_dir,
)
from iflybot_vla_policy.training.config import TrainConfig
from iflybot_vla_policy.training.robot_data import (
    compute_norm_stats,
    normalised_chunks,
    robot_frames,
)
from iflybot_vla_policy.transforms import Transforms

NORM_FILE = 'norm_stats.json'


def run_fast(cfg: TrainConfig) -> dict[str, Any]:
    """Fit and save to `output_dir/final` (FAST files + norm_stats.json); returns statistics:
    token counts per chunk and the round-trip error on chunks held out of the fit."""
    mcfg = model_config(cfg)
    if mcfg.tokens.fast_vocab <= 0:
        raise ValueError(f"model '{cfg.model}' has tokens.fast_vocab = 0: nothing to fit")
    frames = [robot_frames(ds, mcfg.action.horizon, cfg.data.success_only)
              for ds in open_datasets(cfg)]
    norm = compute_norm_stats(frames, Transforms(mcfg), cfg.data.norm_mode)
    transforms = Transforms(mcfg, norm)
    chunks = np.concatenate([normalised_chunks(rf, transforms) for rf in frames])  # (n, H, A)
    rng = np.random.default_rng(cfg.trainer.seed)
    order = rng.permutation(len(chunks))
    held = order[:max(1, min(500, len(chunks) // 10))]
    fit = order[len(held):][:cfg.data.max_chunks]
    config = dataclass_from_section(FastConfig, cfg.fast, 'fast',
                                    vocab_size=mcfg.tokens.fast_vocab)
    fast = FastTokenizer(config).fit(chunks[fit] if len(fit) else chunks)
    out = output_dir(cfg) / FINAL
    fast.save(out)
    norm.save(out / NORM_FILE)
    lengths = np.array([len(fast.encode(c)) for c in chunks[held]])
    decoded = np.stack([fast.decode(fast.encode(c)) for c in chunks[held]])
    err = np.abs(decoded - chunks[held])
    return {'stage': 'fast', 'final': str(out), 'chunks_fit': int(len(fit)),
            'vocab_size': fast.vocab_size, 'tokens_mean': float(lengths.mean()),
            'tokens_max': int(lengths.max()), 'roundtrip_max_abs_error': float(err.max()),
            'roundtrip_rms_error': float(np.sqrt((err ** 2).mean())),
            'norm_mode': norm.mode}
