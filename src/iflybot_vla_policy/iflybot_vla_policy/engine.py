"""Inference engine: per chunk, the VLM prefix once, the latent tokens with the cache, then N
Euler steps of the expert on the cached (projected) KV.

`recompute_prefix_every_step=True` re-encodes the prefix (and the chosen latent tokens) before
every Euler step instead; it exists only so tests and benchmarks can show that caching changes
nothing but the time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from iflybot_vla_policy.model.action_expert import euler_sample
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
    compile: torch.compile the expert (off by default: compile time dominates on CPU).
    """

    def __init__(self, model: VLA, dtype: str = 'float32', compile: bool = False,
                 device: str | torch.device | None = None) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f'dtype must be one of {sorted(_DTYPES)}, got {dtype!r}')
        self.model = model.eval()
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device) if device is not None else \
            next(model.parameters()).device
        self.model.to(device=self.device, dtype=self.dtype)
        self._expert = torch.compile(model.expert) if compile else model.expert
        self.cfg = model.cfg

    def noise(self, batch: int, seed: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        a = self.cfg.action
        if generator is None:
            generator = torch.Generator(device='cpu').manual_seed(0 if seed is None else seed)
        return torch.randn(batch, a.horizon, a.action_dim, generator=generator).to(self.device)

    @torch.inference_mode()
    def sample(self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
               state: torch.Tensor, *, seed: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               steps: int | None = None,
               recompute_prefix_every_step: bool = False) -> EngineOutput:
        """images (B, n_cam, 3, S, S), text (B, T), state (B, state_dim) -> EngineOutput."""
        model, cfg = self.model, self.cfg
        dev = self.device
        steps = steps or cfg.flow.denoise_steps
        images = as_float_images(images).to(dev, self.dtype)
        text_ids, text_mask = text_ids.to(dev), text_mask.to(dev)
        state = state.to(dev, torch.float32)
        if noise is None:
            noise = self.noise(images.shape[0], seed, generator)
        noise = noise.to(dev, torch.float32)
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        prefix = model.backbone.encode_prefix(images, text_ids, text_mask)
        t1 = time.perf_counter()
        codes, prefix = model.backbone.generate_latents(prefix, cfg.tokens.latent_tokens)
        t2 = time.perf_counter()
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
        t3 = time.perf_counter()
        timing['denoise'] = (t3 - t2) * 1e3
        timing['total'] = (t3 - t0) * 1e3
        return EngineOutput(actions.float(), codes, timing)
