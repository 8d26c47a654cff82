"""FAST tokenizer: bounded round-trip error, compression on smooth chunks, robust decoding.

Error bounds asserted here (scale s, horizon H): the orthonormal DCT keeps L2 norms, and rounding
moves each coefficient by at most 0.5 / s, so per action dimension the L2 error over the horizon
is at most 0.5 * sqrt(H) / s (RMS at most 0.5 / s). That is a guarantee. In practice the error of
a single value is much smaller, because only a few low-frequency coefficients of a smooth chunk
are large; on these chunks the max abs error stays at about 1 / s and we assert <= 1.5 / s.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from iflybot_vla_policy.model.fast import CONFIG_FILE, TOKENIZER_FILE, FastConfig, FastTokenizer

HORIZON, DIM = 30, 8


def smooth_chunks(n: int, rng: np.random.Generator, horizon: int = HORIZON,
                  dim: int = DIM) -> np.ndarray:
    """(n, horizon, dim) sums of 4 low-frequency sinusoids, each dimension scaled to [-1, 1]."""
    t = np.linspace(0.0, 1.0, horizon)[None, :, None, None]
    freq = rng.uniform(0.2, 2.0, (n, 1, dim, 4))
    phase = rng.uniform(0.0, 2 * np.pi, (n, 1, dim, 4))
    amp = rng.normal(0.0, 1.0, (n, 1, dim, 4)) / np.arange(1, 5)
    x = (amp * np.sin(2 * np.pi * freq * t + phase)).sum(-1)
    return x / np.abs(x).max(axis=1, keepdims=True)


@pytest.fixture(scope='module')
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return smooth_chunks(1500, rng), smooth_chunks(200, rng)


@pytest.fixture(scope='module')
def fitted(data: tuple[np.ndarray, np.ndarray]) -> FastTokenizer:
    return FastTokenizer(FastConfig(scale=10.0, vocab_size=1024)).fit(data[0])


def test_round_trip_error_stays_within_the_rounding_bound(fitted, data) -> None:
    held_out = data[1]
    scale = fitted.config.scale
    decoded = fitted.decode_batch(fitted.encode_batch(held_out))
    assert decoded.shape == held_out.shape and decoded.dtype == np.float32
    err = decoded - held_out                                   # (N, horizon, dim)
    l2_per_dim = np.sqrt((err ** 2).sum(axis=1))               # (N, dim)
    assert l2_per_dim.max() <= 0.5 * np.sqrt(HORIZON) / scale
    assert np.sqrt((err ** 2).mean()) <= 0.5 / scale
    assert np.abs(err).max() <= 1.5 / scale


def test_round_trip_is_finer_with_a_larger_scale(data) -> None:
    train, held_out = data
    errors = []
    for scale in (5.0, 20.0):
        tok = FastTokenizer(FastConfig(scale=scale, vocab_size=1024)).fit(train)
        errors.append(np.abs(tok.decode_batch(tok.encode_batch(held_out)) - held_out).max())
    assert errors[1] < errors[0] / 2


def test_smooth_chunks_compress_to_fewer_tokens_than_values(fitted, data) -> None:
    tokens = fitted.encode_batch(data[1])
    mean_len = float(np.mean([len(t) for t in tokens]))
    ratio = HORIZON * DIM / mean_len
    print(f'FAST compression: {mean_len:.1f} tokens per {HORIZON}x{DIM} chunk, '
          f'ratio {ratio:.2f}, vocab {fitted.vocab_size}')
    assert ratio > 3.0
    assert all(0 <= i < fitted.vocab_size for t in tokens for i in t)


def test_encode_matches_encode_batch(fitted, data) -> None:
    chunks = data[1][:5]
    assert [fitted.encode(c) for c in chunks] == fitted.encode_batch(chunks)


def test_vocabulary_size_follows_the_config(data) -> None:
    tok = FastTokenizer(FastConfig(vocab_size=300)).fit(data[0])
    assert tok.vocab_size == 300
    assert tok.config.alphabet_size <= 300
    assert (tok.config.horizon, tok.config.action_dim) == (HORIZON, DIM)


def test_save_then_load_gives_identical_encodings(fitted, data, tmp_path) -> None:
    fitted.save(tmp_path)
    loaded = FastTokenizer.load(tmp_path)
    assert loaded.config == fitted.config
    assert loaded.vocab_size == fitted.vocab_size
    assert loaded.encode_batch(data[1]) == fitted.encode_batch(data[1])
    ids = fitted.encode(data[1][0])
    np.testing.assert_array_equal(loaded.decode(ids), fitted.decode(ids))


@pytest.mark.parametrize('tokens', [
    [],
    [-1, 10**9, 3],
    [5] * 10_000,
    [1.5, 'x', None, 2],
    np.array([[1, 2], [3, 4]]),
])
def test_malformed_tokens_decode_to_a_chunk_of_the_right_shape(fitted, tokens) -> None:
    out = fitted.decode(tokens)
    assert out.shape == (HORIZON, DIM) and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_truncated_tokens_lose_only_high_frequencies(fitted, data) -> None:
    chunk = data[1][0]
    ids = fitted.encode(chunk)
    full_err = np.abs(fitted.decode(ids) - chunk).max()
    cut_err = np.abs(fitted.decode(ids[: len(ids) * 2 // 3]) - chunk).max()
    zero_err = np.abs(fitted.decode([]) - chunk).max()
    assert full_err <= cut_err < zero_err


def test_decode_with_an_explicit_shape(fitted, data) -> None:
    ids = fitted.encode(data[1][0])
    assert fitted.decode(ids, horizon=10, action_dim=3).shape == (10, 3)


def test_alphabet_too_large_for_vocabulary_is_rejected(data) -> None:
    with pytest.raises(ValueError, match='vocab_size'):
        FastTokenizer(FastConfig(scale=1000.0, vocab_size=256)).fit(data[0])


@pytest.mark.parametrize('bad', [np.zeros((4, 30)), np.full((2, 30, 8), np.nan)])
def test_bad_chunks_are_rejected(bad) -> None:
    with pytest.raises(ValueError):
        FastTokenizer().fit(bad)


def test_unfitted_tokenizer_says_so() -> None:
    with pytest.raises(RuntimeError, match='not fitted'):
        FastTokenizer().encode(np.zeros((HORIZON, DIM)))


@pytest.mark.parametrize('field', ['scale', 'vocab_size', 'min_frequency'])
def test_invalid_config_names_the_field(field) -> None:
    with pytest.raises(ValueError, match=field):
        FastConfig(**{field: 0})


def test_load_errors_name_the_file_and_key(fitted, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        FastTokenizer.load(tmp_path)
    fitted.save(tmp_path)
    raw = json.loads((tmp_path / CONFIG_FILE).read_text())
    del raw['scale']
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="missing key 'scale'"):
        FastTokenizer.load(tmp_path)
    fitted.save(tmp_path / 'again')
    (tmp_path / 'again' / TOKENIZER_FILE).write_text('{"truncated": ')
    with pytest.raises(ValueError, match=TOKENIZER_FILE):
        FastTokenizer.load(tmp_path / 'again')
