"""Benchmark: FAST tokenizer and latent action model costs, each beside a naive baseline.

- FAST: encode and decode of one 30x8 chunk (the paper's horizon, FR3 joint actions) with the
  fitted tokenizer; the DCT + inverse DCT step alone with scipy versus a per-element Python
  loop (the textbook double sum), which is what the tokenizer would cost without a vectorised
  DCT; batched encoding per chunk.
- LAM: encode (frame pair -> 8 codes) in ms per pair for the default 64x64 model, one pair at a
  time versus batches of 32 (what labelling a dataset uses), and one training step.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

HORIZON, DIM = 30, 8


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    fn()                                                   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def _smooth_chunks(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, HORIZON, DIM) sums of low-frequency sinusoids scaled to [-1, 1] per dimension."""
    t = np.linspace(0.0, 1.0, HORIZON)[None, :, None, None]
    x = (rng.normal(0.0, 1.0, (n, 1, DIM, 4)) / np.arange(1, 5)
         * np.sin(2 * np.pi * rng.uniform(0.2, 2.0, (n, 1, DIM, 4)) * t
                  + rng.uniform(0.0, 2 * np.pi, (n, 1, DIM, 4)))).sum(-1)
    return x / np.abs(x).max(axis=1, keepdims=True)


def naive_dct_roundtrip(chunk: np.ndarray) -> np.ndarray:
    """Orthonormal DCT-II then DCT-III of (horizon, dim) with per-element Python loops."""
    n, d = len(chunk), len(chunk[0])
    rows = chunk.tolist()
    coeff = [[0.0] * d for _ in range(n)]
    for j in range(d):
        for k in range(n):
            s = 0.0
            for i in range(n):
                s += rows[i][j] * math.cos(math.pi * (i + 0.5) * k / n)
            coeff[k][j] = s * math.sqrt((1.0 if k == 0 else 2.0) / n)
    out = [[0.0] * d for _ in range(n)]
    for j in range(d):
        for i in range(n):
            s = coeff[0][j] / math.sqrt(n)
            for k in range(1, n):
                s += coeff[k][j] * math.sqrt(2.0 / n) * math.cos(math.pi * (i + 0.5) * k / n)
            out[i][j] = s
    return np.asarray(out)


def _bench_fast(quick: bool) -> dict:
    from scipy.fft import dct, idct

    from iflybot_vla_policy.model.fast import FastConfig, FastTokenizer

    rng = np.random.default_rng(0)
    train = _smooth_chunks(500 if quick else 3000, rng)
    test = _smooth_chunks(64, rng)
    t0 = time.perf_counter()
    tok = FastTokenizer(FastConfig(vocab_size=1024)).fit(train)
    fit_s = time.perf_counter() - t0
    repeats = 50 if quick else 300
    chunk = test[0]
    ids = tok.encode(chunk)
    scipy_rt = _median_us(lambda: idct(dct(chunk, axis=0, norm='ortho'), axis=0, norm='ortho'),
                          repeats)
    naive_rt = _median_us(lambda: naive_dct_roundtrip(chunk), max(5, repeats // 10))
    assert np.allclose(naive_dct_roundtrip(chunk), chunk, atol=1e-9)
    batch_us = _median_us(lambda: tok.encode_batch(test), max(5, repeats // 10)) / len(test)
    lengths = [len(t) for t in tok.encode_batch(test)]
    return {
        'chunk': f'{HORIZON}x{DIM}', 'vocab_size': tok.vocab_size,
        'fit_s': round(fit_s, 3), 'fit_chunks': len(train),
        'encode_us': round(_median_us(lambda: tok.encode(chunk), repeats), 1),
        'encode_batch_us_per_chunk': round(batch_us, 1),
        'decode_us': round(_median_us(lambda: tok.decode(ids), repeats), 1),
        'tokens_per_chunk': round(float(np.mean(lengths)), 1),
        'compression_ratio': round(HORIZON * DIM / float(np.mean(lengths)), 2),
        'dct_roundtrip_scipy_us': round(scipy_rt, 1),
        'dct_roundtrip_naive_python_us': round(naive_rt, 1),
        'dct_speedup_vs_naive': round(naive_rt / scipy_rt, 1),
    }


def _bench_lam(quick: bool) -> dict:
    import torch

    from iflybot_vla_policy.model.lam import LAMConfig, LatentActionModel

    torch.manual_seed(0)
    cfg = LAMConfig()
    model = LatentActionModel(cfg).eval()
    rng = np.random.default_rng(0)
    batch = 32
    frames = rng.integers(0, 256, (2, batch, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    repeats = 5 if quick else 20
    one_by_one = _median_us(lambda: model.encode(frames[0][:1], frames[1][:1]), repeats)
    batched = _median_us(lambda: model.encode(frames[0], frames[1]), max(3, repeats // 4))
    train_model = LatentActionModel(cfg).train()
    optim = torch.optim.AdamW(train_model.parameters(), lr=1e-4)

    def step() -> None:
        out = train_model(frames[0], frames[1])
        optim.zero_grad()
        out['loss'].backward()
        optim.step()

    step_ms = _median_us(step, 2 if quick else 5) / 1e3
    return {
        'image_size': cfg.image_size, 'params': sum(p.numel() for p in model.parameters()),
        'torch_threads': torch.get_num_threads(),
        'encode_ms_per_pair_batch1': round(one_by_one / 1e3, 2),
        'encode_ms_per_pair_batch32': round(batched / 1e3 / batch, 2),
        'batching_speedup': round(one_by_one * batch / batched, 1),
        'train_step_ms_batch32': round(step_ms, 1),
    }


def run(quick: bool = False) -> dict:
    """FAST encode/decode microseconds and DCT vs naive loop; LAM encode ms per pair."""
    return {'fast': _bench_fast(quick), 'lam': _bench_lam(quick)}


if __name__ == '__main__':
    import json
    import sys

    print(json.dumps(run(quick='--quick' in sys.argv), indent=2))
