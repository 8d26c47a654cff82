"""Inference engine: per chunk, the VLM prefix once, the latent tokens with the cache, then N
Euler steps of the expert on the cached (projected) KV.

Two paths compute the same chunk:
- fast (the default): the prefix with channels-last convolutions and lean decoder layers that
  skip what the expert never reads, the latent tokens decoded into preallocated KV buffers with
  static shapes and no host synchronisation, the Euler loop with everything that does not
  depend on x_t hoisted out of it (backbone.encode_prefix_fast / decode_latents_static,
  action_expert.euler_sample_fast). Backbones whose decoder layers the lean path does not know
  keep transformers' prefix and decoding there.
- eager (`eager=True`): the modules' own forward passes, the reference the fast path is tested
  against (equal to ~1e-6 in float32).

With `compile` or on a GPU the fast path has static shapes (instructions padded to
`backbone.max_text_tokens`) and no host synchronisation inside a chunk, so torch.compile takes
the whole chunk as one graph that never recompiles for a new instruction or image (tests check
it with dynamo's counters); on a CPU without it, the padding after the instruction is dropped
first (one read of the mask). Compilation is off by default, by measurement
(docs/benchmarks.md): inductor gained at most ~10% on this CPU for ~2 min of compilation on 2
cores, and nothing against the later fast path.

`rtc=RTCGuide(...)` samples the chunk by real-time chunking (rtc.py): the prefix as above,
then the guided Euler loop outside inference mode (the guidance differentiates through the
expert), on either path.

`recompute_prefix_every_step=True` (eager) re-encodes the prefix (and the chosen latent tokens)
before every Euler step instead; it exists only so tests and benchmarks can show that caching
changes nothing but the time.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from dataclasses import dataclass, field

import torch

from iflybot_vla_policy import rtc as rtc_mod
from iflybot_vla_policy.model.action_expert import (
    EagerSteps,
    ExpertContext,
    FastSteps,
    context_fast,
    euler_sample,
    euler_sample_fast,
)
from iflybot_vla_policy.model.vla import VLA, as_float_images

_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


@dataclass
class EngineOutput:
    actions: torch.Tensor        # (B, horizon, action_dim) normalised model actions, float32
    latent_tokens: torch.Tensor  # (B, n_latent) int64 codes
    timing_ms: dict[str, float] = field(default_factory=dict)


class InferenceEngine:
    """Batched, deterministic (given a seed or generator) chunk sampling under inference_mode.

    dtype: 'float32' (CPU default) or 'bfloat16'/'float16' (GPU; the model is cast in place).
    eager: run the modules' own forward passes instead of the fast path (module docstring).
    compile: torch.compile the chunk: True for inductor with frozen weights (deployment: a
      later weight update is not seen), or a backend name ('eager' traces only, for tests);
      on the eager path it compiles the expert. Compilation happens in `warm_up`.
    """

    def __init__(self, model: VLA, dtype: str = 'float32', compile: bool | str = False,
                 device: str | torch.device | None = None, eager: bool = False) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f'dtype must be one of {sorted(_DTYPES)}, got {dtype!r}')
        self.model = model.eval()
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device) if device is not None else \
            next(model.parameters()).device
        self.model.to(device=self.device, dtype=self.dtype)
        self.cfg = model.cfg
        self.eager = eager
        self.warmup_s: float | None = None   # set by warm_up()
        if self.device.type == 'cpu' and not eager:
            keep_freed_memory()
        self._expert = model.expert
        self._compiled_chunk = None
        if compile and eager:
            self._expert = torch.compile(model.expert)
        elif compile:
            backend = 'inductor' if compile is True else compile
            options = {'freezing': True} if backend == 'inductor' else None
            self._compiled_chunk = torch.compile(self._fast_chunk, fullgraph=True,
                                                 dynamic=False, backend=backend,
                                                 options=options)
        self.compiled = bool(compile)

    def noise(self, batch: int, seed: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        a = self.cfg.action
        if generator is None:
            generator = torch.Generator(device='cpu').manual_seed(0 if seed is None else seed)
        return torch.randn(batch, a.horizon, a.action_dim, generator=generator).to(self.device)

    def sample(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
               state: torch.Tensor, *, seed: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               steps: int | None = None, recompute_prefix_every_step: bool = False,
               rtc: rtc_mod.RTCGuide | None = None) -> EngineOutput:
        """images (B, n_cam, 3, S, S) uint8 or float in [0, 1], text (B, T), state
        (B, state_dim) -> EngineOutput. `rtc`: inpaint the chunk into the previous one's
        remainder (real-time chunking, rtc.py)."""
        if rtc is not None:
            if recompute_prefix_every_step:
                raise ValueError('rtc and recompute_prefix_every_step cannot be combined')
            return self._sample_rtc(images, text_ids, text_mask, state, seed, generator,
                                    noise, steps, rtc)
        return self._sample(images, text_ids, text_mask, state, seed, generator, noise,
                            steps, recompute_prefix_every_step)

    def _inputs(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                state: torch.Tensor, seed: int | None, generator: torch.Generator | None,
                noise: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        dev = self.device
        if noise is None:
            noise = self.noise(images.shape[0], seed, generator)
        return (images.to(dev), text_ids.to(dev), text_mask.to(dev),
                state.to(dev, torch.float32), noise.to(dev, torch.float32))

    @torch.inference_mode()
    def _sample(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                state: torch.Tensor, seed: int | None, generator: torch.Generator | None,
                noise: torch.Tensor | None, steps: int | None,
                recompute_prefix_every_step: bool) -> EngineOutput:
        steps = steps or self.cfg.flow.denoise_steps
        images, text_ids, text_mask, state, noise = self._inputs(
            images, text_ids, text_mask, state, seed, generator, noise)
        if self.eager or recompute_prefix_every_step:
            images = as_float_images(images).to(self.dtype)
            return self._sample_eager(images, text_ids, text_mask, state, noise, steps,
                                      recompute_prefix_every_step)
        if self._compiled_chunk is not None:             # one graph: no stage timings
            # the graph is guarded on its inputs' dispatch keys: made alike here (inference
            # tensors, small copies), whether a caller built them inside inference_mode or not
            args = [t if t.is_inference() else t.clone()
                    for t in (images, text_ids, text_mask, state, noise)]
            t0 = self._clock()
            actions, codes = self._compiled_chunk(*args, steps)
            total = (self._clock() - t0) * 1e3
            return EngineOutput(actions.float(), codes, {'total': total})
        timing: dict[str, float] = {}
        actions, codes = self._fast_chunk(images, text_ids, text_mask, state, noise, steps,
                                          timing)
        return EngineOutput(actions.float(), codes, timing)

    def _sample_rtc(self, images: torch.Tensor, text_ids: torch.Tensor,
                    text_mask: torch.Tensor, state: torch.Tensor, seed: int | None,
                    generator: torch.Generator | None, noise: torch.Tensor | None,
                    steps: int | None, guide: rtc_mod.RTCGuide) -> EngineOutput:
        """The prefix and the per-chunk expert state under inference mode (as `_sample`),
        then the guided loop with autograd (the uncompiled modules, on a compiled engine
        too). Timing 'denoise' includes the copies autograd needs."""
        steps = steps or self.cfg.flow.denoise_steps
        timing: dict[str, float] = {}
        with torch.inference_mode():
            images, text_ids, text_mask, state, noise = self._inputs(
                images, text_ids, text_mask, state, seed, generator, noise)
            t0 = self._clock()
            if self.eager:
                ctx, codes, t1 = self._eager_context(as_float_images(images).to(self.dtype),
                                                     text_ids, text_mask)
                steps_state = EagerSteps.build(self.model.expert, state, ctx, steps)
            else:
                ctx, codes, t1 = self._fast_context(images, text_ids, text_mask)
                steps_state = FastSteps.build(self.model.expert, state, ctx, steps)
        t2 = self._clock()
        with torch.no_grad():
            steps_state = rtc_mod.autograd_ready(steps_state)
            actions = rtc_mod.sample(steps_state.velocity, rtc_mod.autograd_ready(noise),
                                     steps, guide)
        t3 = self._clock()
        timing.update(prefix=(t1 - t0) * 1e3, latent=(t2 - t1) * 1e3,
                      denoise=(t3 - t2) * 1e3, total=(t3 - t0) * 1e3)
        return EngineOutput(actions.float(), codes, timing)

    def _eager_context(self, images: torch.Tensor, text_ids: torch.Tensor,
                       text_mask: torch.Tensor) -> tuple[ExpertContext, torch.Tensor, float]:
        """The eager prefix, latent codes and expert context; the clock after the prefix."""
        bb = self.model.backbone
        prefix = bb.encode_prefix(images, text_ids, text_mask)
        t1 = self._clock()
        codes, prefix = bb.generate_latents(prefix, self.cfg.tokens.latent_tokens)
        return self.model.context_from_prefix(prefix), codes, t1

    def _sample_eager(self, images: torch.Tensor, text_ids: torch.Tensor,
                      text_mask: torch.Tensor, state: torch.Tensor, noise: torch.Tensor,
                      steps: int, recompute_prefix_every_step: bool) -> EngineOutput:
        model, cfg = self.model, self.cfg
        timing: dict[str, float] = {}
        t0 = self._clock()
        prefix = model.backbone.encode_prefix(images, text_ids, text_mask)
        t1 = self._clock()
        codes, prefix = model.backbone.generate_latents(prefix, cfg.tokens.latent_tokens)
        t2 = self._clock()
        timing['prefix'] = (t1 - t0) * 1e3
        timing['latent'] = (t2 - t1) * 1e3
        expert = self._expert
        if recompute_prefix_every_step:
            offset = cfg.latent_offset

            def ctx_fn(_step: int):
                p = model.backbone.encode_prefix(images, text_ids, text_mask)
                if codes.shape[1]:
                    p = model.backbone.append_tokens(p, codes + offset)
                return model.context_from_prefix(p)
        else:
            ctx = model.context_from_prefix(prefix)

            def ctx_fn(_step: int):
                return ctx
        actions = euler_sample(expert, state, noise, ctx_fn, steps,
                               reuse_context=not recompute_prefix_every_step)
        t3 = self._clock()
        timing['denoise'] = (t3 - t2) * 1e3
        timing['total'] = (t3 - t0) * 1e3
        return EngineOutput(actions.float(), codes, timing)

    def _fast_chunk(self, images: torch.Tensor, text_ids: torch.Tensor,
                    text_mask: torch.Tensor, state: torch.Tensor, noise: torch.Tensor,
                    steps: int, timing: dict[str, float] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fast path: (actions, latent codes); stage times (ms) into `timing` if given."""
        clock = self._clock if timing is not None else _no_clock
        t0 = clock()
        ctx, codes, t1 = self._fast_context(images, text_ids, text_mask, clock)
        t2 = clock()
        actions = euler_sample_fast(self.model.expert, state, noise, ctx, steps)
        t3 = clock()
        if timing is not None:
            timing.update(prefix=(t1 - t0) * 1e3, latent=(t2 - t1) * 1e3,
                          denoise=(t3 - t2) * 1e3, total=(t3 - t0) * 1e3)
        return actions, codes

    def _fast_context(self, images: torch.Tensor, text_ids: torch.Tensor,
                      text_mask: torch.Tensor, clock=None,
                      ) -> tuple[ExpertContext, torch.Tensor, float]:
        """The fast prefix, latent codes and expert context; `clock()` after the prefix."""
        bb = self.model.backbone
        n = self.cfg.tokens.latent_tokens
        clock = clock or self._clock
        # static: fixed shapes, nothing read back (compiled, or a GPU); on a CPU the shapes
        # may follow the instruction: padding columns are dropped and, with none left, the
        # attention runs without masks (the same chunk; ~15% fewer tokens in the LM)
        static = torch.compiler.is_compiling() or self.device.type != 'cpu'
        if not static:
            text_ids, text_mask = _drop_padding(text_ids, text_mask)
        if bb.lean_layers:
            prefix = bb.encode_prefix_fast(images, text_ids, text_mask, latent_slots=n,
                                           static=static)
            t1 = clock()
            codes, prefix = bb.decode_latents_static(prefix, n)
        else:
            prefix = bb.encode_prefix(as_float_images(images).to(self.dtype), text_ids,
                                      text_mask)
            t1 = clock()
            codes, prefix = bb.generate_latents(prefix, n)
        mask = None if not static and bool(prefix.mask.all()) else prefix.mask
        ctx = context_fast(self.model.expert, prefix.kv, mask, prefix.features, prefix.summary)
        return ctx, codes, t1

    def _clock(self) -> float:
        """Stage boundaries wait for the device, so stage timings measure work, not launches."""
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def warm_up(self, text_ids: torch.Tensor, text_mask: torch.Tensor, batch: int = 1,
                runs: int = 2) -> float:
        """Run `runs` chunks on blank inputs: builds the fast path's derived weights (and
        compiles, with `compile`), so the first real chunk is not the slow one. Returns and
        keeps (`warmup_s`) the seconds it took; text_ids/text_mask (T,): one instruction."""
        cfg, a = self.cfg, self.cfg.action
        images = torch.zeros(batch, len(cfg.cameras), 3, cfg.image_size, cfg.image_size,
                             dtype=torch.uint8)
        ids, mask = text_ids.expand(batch, -1), text_mask.expand(batch, -1)
        state = torch.zeros(batch, a.state_dim)
        noise = torch.zeros(batch, a.horizon, a.action_dim)
        t0 = time.perf_counter()
        for _ in range(runs):
            self.sample(images, ids, mask, state, noise=noise)
        self.warmup_s = time.perf_counter() - t0
        return self.warmup_s


def _no_clock() -> float:
    return 0.0


def _drop_padding(text_ids: torch.Tensor,
                  text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the text columns after the last real token of every row (instructions are padded
    at the end; what follows the last real token changes nothing before it). Not when a row
    is empty: an empty instruction's FiLM encoding reads its padding."""
    mask = text_mask.bool()
    if not bool(mask.any(1).all()):
        return text_ids, text_mask
    keep = int(mask.any(0).nonzero()[-1]) + 1
    return text_ids[:, :keep], text_mask[:, :keep]


_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed activation buffers back to the kernel (process-wide,
    once; True if applied).

    Why: glibc trims the heap top once more than ~2x its mmap threshold (128 KiB..32 MiB,
    adapted at run time) is free, so each chunk's activations, freed at its end, are faulted
    back in 4 KiB at a time by the next chunk: ~1,100 minor page faults per chunk of the
    bundled checkpoint, ~2.5 ms of its ~25 ms on this VM (a fault costs ~2.5 us under
    virtualisation). Fixed thresholds of 32 MiB (mmap) and 256 MiB (trim) keep the steady-state
    working set mapped. Only glibc; elsewhere (musl, macOS) nothing changes.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith('linux'):
        return _MALLOC_TUNED
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _MALLOC_TUNED = bool(mallopt(m_mmap_threshold, 32 << 20)) and \
        bool(mallopt(m_trim_threshold, 256 << 20))
    return _MALLOC_TUNED
