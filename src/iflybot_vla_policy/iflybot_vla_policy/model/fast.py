"""FAST action tokenizer (Pertsch et al. 2025): DCT over time, quantise, then BPE.

iFlyBot-VLA predicts FAST tokens of the action chunk as an auxiliary target of the VLM, so the
backbone learns low-level dynamics in its own (discrete) currency. The pipeline per chunk:

1. the chunk is already normalised by the caller (roughly [-1, 1] per action dimension);
2. DCT-II over time per action dimension (orthonormal, ``norm='ortho'``);
3. coefficients times ``scale``, rounded to integers;
4. flattened row-major over (frequency, dimension): all dimensions' lowest frequency first, then
   the next frequency, ... (FAST's order, so truncating a sequence drops the highest frequencies);
5. integers mapped to one character each and compressed with a byte-pair encoding fitted on data
   (HF ``tokenizers``); the token ids are the output.

Decoding inverts 5 -> 2. Because the orthonormal DCT preserves the L2 norm, rounding errors of at
most ``0.5 / scale`` per coefficient give, for every action dimension of a horizon-H chunk, an
L2 reconstruction error of at most ``0.5 * sqrt(H) / scale`` (RMS error at most
``0.5 / scale``), as long as no coefficient falls outside the alphabet fitted on the training
chunks (those are clipped to it).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.fft import dct, idct
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

CONFIG_FILE = 'fast_config.json'
TOKENIZER_FILE = 'tokenizer.json'
FORMAT_VERSION = 1
# Integers map to characters starting here: past ASCII whitespace/control characters, and far
# below the UTF-16 surrogate block (0xD800) for any alphabet we accept.
_CHAR_BASE = 0x100
_MAX_ALPHABET = 0xD800 - _CHAR_BASE


@dataclass(frozen=True)
class FastConfig:
    """FAST knobs; ``min_token``..``max_token``, ``horizon``, ``action_dim`` are set by ``fit``."""

    scale: float = 10.0          # DCT coefficients are multiplied by this before rounding
    vocab_size: int = 1024       # BPE target vocabulary (alphabet + merges); paper: 2048
    min_frequency: int = 2       # a pair must occur this often to be merged
    min_token: int = 0           # smallest quantised coefficient in the alphabet
    max_token: int = 0           # largest quantised coefficient in the alphabet
    horizon: int = 0             # chunk length seen by fit (decode default); 0 = not fitted
    action_dim: int = 0          # action dimensions seen by fit (decode default)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f'FastConfig.scale must be a positive number, got {self.scale!r}')
        if self.vocab_size < 2:
            raise ValueError(f'FastConfig.vocab_size must be >= 2, got {self.vocab_size!r}')
        if self.min_frequency < 1:
            raise ValueError(
                f'FastConfig.min_frequency must be >= 1, got {self.min_frequency!r}')
        if self.max_token < self.min_token:
            raise ValueError(f'FastConfig.max_token ({self.max_token}) is below min_token '
                             f'({self.min_token})')
        if self.horizon < 0 or self.action_dim < 0:
            raise ValueError(f'FastConfig.horizon/action_dim must be >= 0, got '
                             f'{self.horizon!r}/{self.action_dim!r}')

    @property
    def alphabet_size(self) -> int:
        return self.max_token - self.min_token + 1


class FastTokenizer:
    """Action chunk (horizon, action_dim) <-> list of BPE token ids in [0, vocab_size)."""

    def __init__(self, config: FastConfig | None = None, tokenizer: Tokenizer | None = None):
        self.config = config or FastConfig()
        self._tokenizer = tokenizer
        self._id_values: list[np.ndarray] = []   # token id -> its quantised coefficients
        if tokenizer is not None:
            self._build_tables()

    # ------------------------------------------------------------------ fitting

    def fit(self, chunks: np.ndarray) -> FastTokenizer:
        """Fit the alphabet range and the BPE merges on normalised chunks (N, horizon, dim).

        Returns self. Raises ValueError if the quantised alphabet does not fit the vocabulary
        (lower ``scale`` or raise ``vocab_size``).
        """
        chunks = _as_chunks(chunks, 'chunks', ndim=3)
        n, horizon, action_dim = chunks.shape
        if n == 0:
            raise ValueError('fit needs at least one chunk, got chunks of shape (0, ...)')
        coeffs = self._quantise(chunks)                      # (N, horizon, action_dim) int64
        lo, hi = int(coeffs.min()), int(coeffs.max())
        alphabet = hi - lo + 1
        if alphabet > min(self.config.vocab_size, _MAX_ALPHABET):
            raise ValueError(
                f'FAST alphabet of {alphabet} quantised values ({lo}..{hi} at scale '
                f'{self.config.scale}) exceeds FastConfig.vocab_size={self.config.vocab_size}: '
                'lower scale, raise vocab_size, or normalise the chunks to about [-1, 1]')
        self.config = dataclasses.replace(self.config, min_token=lo, max_token=hi,
                                          horizon=horizon, action_dim=action_dim)
        tokenizer = Tokenizer(BPE())
        trainer = BpeTrainer(
            vocab_size=self.config.vocab_size, min_frequency=self.config.min_frequency,
            show_progress=False, special_tokens=[],
            initial_alphabet=[chr(_CHAR_BASE + i) for i in range(alphabet)],
            limit_alphabet=alphabet)
        tokenizer.train_from_iterator((self._to_text(c) for c in coeffs), trainer=trainer,
                                      length=n)
        self._tokenizer = tokenizer
        self._build_tables()
        return self

    # ------------------------------------------------------------------ encode / decode

    @property
    def vocab_size(self) -> int:
        """Number of token ids (alphabet + merges); ids are in [0, vocab_size)."""
        return self._require_fitted().get_vocab_size()

    @property
    def is_fitted(self) -> bool:
        return self._tokenizer is not None

    def encode(self, chunk: np.ndarray) -> list[int]:
        """Token ids of one normalised chunk (horizon, action_dim).

        Coefficients outside the fitted alphabet are clipped to it (only reachable by chunks
        unlike the fitting data).
        """
        tokenizer = self._require_fitted()
        chunk = _as_chunks(chunk, 'chunk', ndim=2)
        coeffs = self._quantise(chunk[None])[0]               # (horizon, action_dim)
        return tokenizer.encode(self._to_text(coeffs)).ids

    def encode_batch(self, chunks: np.ndarray) -> list[list[int]]:
        """Token ids of each chunk in (N, horizon, action_dim), encoded in parallel."""
        tokenizer = self._require_fitted()
        chunks = _as_chunks(chunks, 'chunks', ndim=3)
        coeffs = self._quantise(chunks)
        return [e.ids for e in tokenizer.encode_batch([self._to_text(c) for c in coeffs])]

    def decode(self, tokens: Sequence[int] | np.ndarray, horizon: int | None = None,
               action_dim: int | None = None) -> np.ndarray:
        """Chunk (horizon, action_dim) float32 from token ids; never raises on bad tokens.

        Model outputs can be malformed: ids that are not ints or out of range are dropped, and
        the coefficient sequence is zero-padded (missing high frequencies) or truncated to
        horizon * action_dim. ``horizon``/``action_dim`` default to the shape seen by ``fit``.
        """
        self._require_fitted()
        horizon = self.config.horizon if horizon is None else int(horizon)
        action_dim = self.config.action_dim if action_dim is None else int(action_dim)
        if horizon <= 0 or action_dim <= 0:
            raise ValueError(f'decode needs positive horizon and action_dim, got '
                             f'{horizon}/{action_dim}')
        n = horizon * action_dim
        values = [self._id_values[i] for i in _valid_ids(tokens, len(self._id_values))]
        flat = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
        coeffs = np.zeros(n, dtype=np.float64)
        coeffs[:min(n, flat.size)] = flat[:n]
        coeffs = coeffs.reshape(horizon, action_dim) / self.config.scale
        return idct(coeffs, axis=0, norm='ortho').astype(np.float32)

    def decode_batch(self, token_lists: Sequence[Sequence[int]], horizon: int | None = None,
                     action_dim: int | None = None) -> np.ndarray:
        """(N, horizon, action_dim) float32 from N token sequences."""
        return np.stack([self.decode(t, horizon, action_dim) for t in token_lists])

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        """Write ``fast_config.json`` and ``tokenizer.json`` into directory (created)."""
        tokenizer = self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {'format': FORMAT_VERSION, **dataclasses.asdict(self.config)}
        (directory / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + '\n')
        tokenizer.save(str(directory / TOKENIZER_FILE))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> FastTokenizer:
        """Tokenizer saved by ``save``; errors name the missing or bad file and key."""
        directory = Path(directory)
        config_path, tok_path = directory / CONFIG_FILE, directory / TOKENIZER_FILE
        for path in (config_path, tok_path):
            if not path.is_file():
                raise FileNotFoundError(f'FAST tokenizer file missing: {path}')
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f'{config_path}: not valid JSON ({exc})') from exc
        if not isinstance(raw, dict):
            raise ValueError(f'{config_path}: expected a JSON object')
        version = raw.pop('format', None)
        if version != FORMAT_VERSION:
            raise ValueError(f'{config_path}: key "format" is {version!r}, expected '
                             f'{FORMAT_VERSION}')
        fields = {f.name for f in dataclasses.fields(FastConfig)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ValueError(f'{config_path}: unknown key {unknown[0]!r} '
                             f'(valid: {", ".join(sorted(fields))})')
        missing = sorted(fields - set(raw))
        if missing:
            raise ValueError(f'{config_path}: missing key {missing[0]!r}')
        try:
            config = FastConfig(**raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f'{config_path}: {exc}') from exc
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise ValueError(f'{tok_path}: cannot be read as a tokenizers JSON ({exc})') from exc
        return cls(config, tokenizer)

    # ------------------------------------------------------------------ internals

    def _quantise(self, chunks: np.ndarray) -> np.ndarray:
        """(N, horizon, dim) float -> (N, horizon, dim) int64 rounded scaled DCT coefficients."""
        coeffs = dct(chunks, type=2, axis=1, norm='ortho')
        return np.rint(coeffs * self.config.scale).astype(np.int64)

    def _to_text(self, coeffs: np.ndarray) -> str:
        """(horizon, dim) ints -> one character per coefficient, frequency-major order."""
        cfg = self.config
        shifted = np.clip(coeffs.reshape(-1), cfg.min_token, cfg.max_token) - cfg.min_token
        return (shifted + _CHAR_BASE).astype('<u4').tobytes().decode('utf-32-le')

    def _build_tables(self) -> None:
        tokenizer = self._require_fitted()
        lo = self.config.min_token
        table: list[np.ndarray] = []
        for i in range(tokenizer.get_vocab_size()):
            token = tokenizer.id_to_token(i) or ''
            codes = np.frombuffer(token.encode('utf-32-le'), dtype='<u4').astype(np.int64)
            if codes.size and (codes.min() < _CHAR_BASE
                               or codes.max() >= _CHAR_BASE + self.config.alphabet_size):
                raise ValueError(f'tokenizer token {i} ({token!r}) is outside the FAST '
                                 f'alphabet of {self.config.alphabet_size} values')
            table.append(codes - _CHAR_BASE + lo)
        self._id_values = table

    def _require_fitted(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError('FastTokenizer is not fitted: call fit(chunks) or '
                               'FastTokenizer.load(dir)')
        return self._tokenizer


def _as_chunks(x: Any, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        shape = '(N, horizon, action_dim)' if ndim == 3 else '(horizon, action_dim)'
        raise ValueError(f'{name} must have shape {shape}, got {arr.shape}')
    if arr.shape[-1] == 0 or arr.shape[-2] == 0:
        raise ValueError(f'{name} has an empty horizon or action dimension: {arr.shape}')
    if not np.isfinite(arr).all():
        raise ValueError(f'{name} contains NaN or inf')
    return arr


def _valid_ids(tokens: Any, vocab: int) -> list[int]:
    """The ids in tokens that are integers in [0, vocab); anything else is skipped."""
    try:
        items = list(np.asarray(tokens).reshape(-1).tolist())
    except Exception:  # ragged or exotic input: walk it as a plain iterable
        try:
            items = list(tokens)
        except TypeError:
            return []
    out = []
    for t in items:
        if isinstance(t, bool):
            continue
        if isinstance(t, float):
            if not t.is_integer():
                continue
            t = int(t)
        if isinstance(t, int) and 0 <= t < vocab:
            out.append(t)
    return out
