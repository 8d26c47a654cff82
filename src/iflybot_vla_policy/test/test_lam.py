"""Latent action model: learns codes for motion in synthetic video, and keeps its contracts.

The video: dark 32x32 frames with one or two coloured squares or circles, each moving 4 px in one
of 8 directions between frame t and frame t + delta. A small model trains for 200 steps
(~25 s of one CPU core) once per module; the behaviour tests share it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from iflybot_vla_policy.model.lam import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LAMConfig,
    LatentActionModel,
    _EMAQuantizer,
    code_usage,
    train_lam,
)

SIZE = 32
DIRECTIONS = np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)])
SMALL = LAMConfig(image_size=SIZE, patch=8, width=64, depth=2, decoder_depth=2, code_dim=16)


def moving_shapes(n: int, rng: np.random.Generator, size: int = SIZE,
                  shift: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """n frame pairs, uint8 (n, size, size, 3) each: shapes moved by `shift` px between them."""
    yy, xx = np.mgrid[:size, :size]
    first = np.full((n, size, size, 3), 30, np.uint8)
    second = first.copy()
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            r = int(rng.integers(3, 6))
            colour = rng.integers(60, 256, 3)
            cy, cx = rng.integers(r + shift, size - r - shift, 2)
            dy, dx = DIRECTIONS[rng.integers(len(DIRECTIONS))] * shift
            circle = rng.random() < 0.5
            for frames, (y, x) in ((first, (cy, cx)), (second, (cy + dy, cx + dx))):
                if circle:
                    mask = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
                else:
                    mask = (np.abs(yy - y) <= r) & (np.abs(xx - x) <= r)
                frames[i][mask] = colour
    return first, second


def batches(rng: np.random.Generator, batch: int = 32):
    while True:
        yield moving_shapes(batch, rng)


@pytest.fixture(scope='module')
def trained() -> tuple[LatentActionModel, list[dict[str, float]]]:
    torch.manual_seed(0)
    model = LatentActionModel(SMALL)
    history = train_lam(model, batches(np.random.default_rng(0)), steps=200, lr=1e-3,
                        warmup_steps=10)
    return model, history


@pytest.fixture(scope='module')
def held_out() -> tuple[np.ndarray, np.ndarray]:
    return moving_shapes(256, np.random.default_rng(1))


def test_training_uses_more_than_half_of_the_codebook(trained, held_out) -> None:
    model, history = trained
    usage = model.codebook_usage(*held_out)
    print(f'LAM codebook usage on held-out pairs: {usage["used"]}/32, '
          f'perplexity {usage["perplexity"]:.1f}, restarts {sum(r["restarts"] for r in history)}')
    assert usage['used'] > SMALL.codebook_size // 2


def test_reconstruction_loss_falls(trained) -> None:
    _, history = trained
    first = np.mean([r['recon'] for r in history[:20]])
    last = np.mean([r['recon'] for r in history[-20:]])
    print(f'LAM recon loss: first 20 steps {first:.4f}, last 20 steps {last:.4f}')
    assert last < 0.8 * first


def test_codes_carry_the_motion(trained, held_out) -> None:
    """Decoding frame t with its own codes beats decoding it with another pair's codes."""
    model, _ = trained
    frames_t, frames_tp = held_out
    codes = model.encode(frames_t, frames_tp)
    target = torch.as_tensor(frames_tp).permute(0, 3, 1, 2).float() / 255
    own = ((model.decode(frames_t, codes) - target) ** 2).mean()
    shuffled = ((model.decode(frames_t, codes.roll(1, dims=0)) - target) ** 2).mean()
    assert own < 0.9 * shuffled


def test_encode_returns_int64_codes_per_latent_token(trained, held_out) -> None:
    model, _ = trained
    codes = model.encode(held_out[0][:5], held_out[1][:5])
    assert codes.shape == (5, SMALL.n_tokens) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < SMALL.codebook_size


def test_encode_accepts_channels_first_and_float_frames(trained, held_out) -> None:
    model, _ = trained
    a, b = held_out[0][:8], held_out[1][:8]
    reference = model.encode(a, b)
    chw = (torch.as_tensor(a).permute(0, 3, 1, 2), torch.as_tensor(b).permute(0, 3, 1, 2))
    assert torch.equal(model.encode(*chw), reference)
    as_float = (a.astype(np.float32) / 255, b.astype(np.float32) / 255)
    assert torch.equal(model.encode(*as_float), reference)


def test_encode_of_one_pair_does_not_depend_on_the_batch(trained, held_out) -> None:
    model, _ = trained
    a, b = held_out[0][:8], held_out[1][:8]
    assert torch.equal(model.encode(a[:1], b[:1])[0], model.encode(a, b)[0])


def test_save_then_load_gives_identical_codes(trained, held_out, tmp_path) -> None:
    model, _ = trained
    model.save(tmp_path)
    loaded = LatentActionModel.load(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(loaded.encode(*held_out), model.encode(*held_out))


@pytest.mark.parametrize('bad', [
    np.zeros((2, 16, 16, 3), np.uint8),                 # wrong image size
    np.zeros((SIZE, SIZE, 3), np.uint8),                 # no batch axis
    np.zeros((2, SIZE, SIZE, 4), np.uint8),              # RGBA
    np.zeros((0, SIZE, SIZE, 3), np.uint8),              # empty batch
    np.full((2, SIZE, SIZE, 3), 200.0, np.float32),      # float but 0..255
    np.full((2, SIZE, SIZE, 3), np.nan, np.float32),     # NaN
    np.zeros((2, SIZE, SIZE, 3), np.int32),              # neither uint8 nor float
])
def test_bad_frames_raise_value_error(bad) -> None:
    model = LatentActionModel(SMALL).eval()
    with pytest.raises(ValueError, match='frames_t'):
        model.encode(bad, bad)


def test_frame_pairs_of_different_shapes_raise_value_error() -> None:
    model = LatentActionModel(SMALL).eval()
    a = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    with pytest.raises(ValueError, match='differ'):
        model.encode(a, a[:1])


def test_dead_codes_are_restarted_from_recent_encoder_outputs() -> None:
    """Codes initialised on spread-out outputs go unused once the outputs gather in 3 tight
    clusters; the restart moves every such code next to a recent output."""
    torch.manual_seed(0)
    cfg = LAMConfig(code_dim=8, codebook_size=16, restart_every=5, ema_decay=0.5,
                    restart_buffer=128)
    quantizer = _EMAQuantizer(cfg)
    centres = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)

    def closeness() -> float:   # cosine of the code farthest from every cluster
        return float((quantizer.embed @ centres.t()).max(dim=1).values.min())

    spread = torch.nn.functional.normalize(torch.randn(1, 64, 8), dim=-1)
    quantizer(spread, update=True)                   # first batch initialises the codebook
    assert closeness() < 0.9
    restarted = 0
    for _ in range(2 * cfg.restart_every - 1):
        z = centres[torch.randint(3, (64,))] + 0.01 * torch.randn(64, 8)
        restarted += quantizer(torch.nn.functional.normalize(z, dim=-1)[None], update=True)[2]
    assert restarted > 0
    assert closeness() > 0.99


def test_code_usage_counts_codes() -> None:
    stats = code_usage(torch.tensor([[0, 0, 1, 3]]), codebook_size=4)
    assert stats['used'] == 3 and stats['fraction'] == 0.75 and stats['counts'] == [2, 1, 0, 1]
    assert 1.0 < stats['perplexity'] < 3.0


def test_train_lam_reuses_a_reiterable_and_rejects_an_exhausted_iterator() -> None:
    torch.manual_seed(0)
    cfg = LAMConfig(image_size=16, patch=8, width=32, depth=1, decoder_depth=1, heads=2)
    pairs = [moving_shapes(4, np.random.default_rng(i), size=16, shift=2) for i in range(2)]
    history = train_lam(LatentActionModel(cfg), pairs, steps=5, lr=1e-3)
    assert [r['step'] for r in history] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r['loss']) for r in history)
    with pytest.raises(ValueError, match='ran out after 2 of 5'):
        train_lam(LatentActionModel(cfg), iter(pairs), steps=5, lr=1e-3)


def test_training_needs_two_pairs_per_batch() -> None:
    model = LatentActionModel(SMALL).train()
    a, b = moving_shapes(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match='at least 2'):
        model(a, b)


@pytest.mark.parametrize('field, value', [
    ('patch', 7), ('heads', 3), ('codebook_size', 1), ('ema_decay', 1.0), ('n_tokens', 0),
])
def test_invalid_config_names_the_field(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        LAMConfig(**{field: value})


def test_load_errors_name_the_file_and_key(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        LatentActionModel.load(tmp_path)
    LatentActionModel(SMALL).save(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    del state['quantizer.embed']
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="missing key 'quantizer.embed'"):
        LatentActionModel.load(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b'truncated')
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        LatentActionModel.load(tmp_path)



def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        centres = torch.randn(2, 8)
        torch.manual_seed(100 + rank)             # each rank sees different encoder outputs
        quantizer = _EMAQuantizer(LAMConfig(code_dim=8, codebook_size=16, restart_every=3,
                                            ema_decay=0.5))
        for step in range(7):                     # spread out first, then 2 tight clusters
            z = torch.randn(40, 8) if step == 0 else (centres[torch.randint(2, (40,))]
                                                      + 0.05 * torch.randn(40, 8))
            quantizer(torch.nn.functional.normalize(z, dim=-1)[None], update=True)
        torch.save({k: v for k, v in quantizer.state_dict().items() if k != 'recent'},
                   f'{out_dir}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()


def test_codebook_stays_identical_across_data_parallel_ranks(tmp_path) -> None:
    """Under DDP every rank updates its own codebook copy: statistics are all-reduced and
    restarts broadcast from rank 0, so the copies must not drift apart."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2)
    states = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    assert int(states[0]['restarts']) > 0
    for key in ('embed', 'cluster_size', 'embed_sum'):
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=1e-6)
