"""Real-time chunking inside the flow denoiser (Black, Galliker and Levine 2025, "Real-Time
Execution of Action Chunking Flow Policies", arXiv 2506.07339).

While a chunk executes, the next one is computed from an observation taken at its start; by the
time it arrives, the robot has executed `delay` more actions of the old chunk. The new chunk is
therefore sampled as an inpainting of the old one's remainder Y (aligned to the new chunk's
time grid: Y[j] is the old action for the new chunk's step j):

- steps j < delay are frozen to Y (hard inpainting: after every Euler step they are put back on
  the flow path between the chunk's noise and Y, so the result holds Y exactly);
- the overlap delay <= j < len(Y) is guided softly, with the paper's weights decaying
  exponentially from 1 to 0, W_j = c_j (e^c_j - 1) / (e - 1), c_j = (L - j) / (L - delay + 1);
  W_j = 1 for j < delay and 0 from the old chunk's end L on;
- each step's velocity gets the pseudo-inverse guidance term (PiGDM): the vector-Jacobian
  product of the denoised estimate A_hat = x_t - t v(x_t) with the weighted error W (Y - A_hat),
  scaled by min(beta, (t^2 + (1 - t)^2) / (t (1 - t))) (the paper's clipped weight, written in
  this repo's time, where t = 1 is noise and 0 the data).

With no frozen steps and all weights 0 it is plain Euler sampling. The VJP needs autograd
through one expert pass per step: the guided loop runs outside inference mode, on copies of the
per-chunk tensors that inference mode made (`autograd_ready`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from iflybot_vla_policy.model.action_expert import flow_times
from iflybot_vla_policy.model.derived import Dense

SCHEDULES = ('exp', 'linear', 'ones', 'zeros')
DEFAULT_MAX_GUIDANCE = 5.0   # the paper's beta


@dataclass(frozen=True)
class RTCConfig:
    """How the overlap is guided. schedule: the overlap's weights ('exp' is the paper's,
    'linear' c_j, 'ones' all 1, 'zeros' none: hard inpainting of the frozen steps only);
    max_guidance: the paper's beta, the clip on the guidance weight."""

    schedule: str = 'exp'
    max_guidance: float = DEFAULT_MAX_GUIDANCE

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f'rtc schedule must be one of {list(SCHEDULES)}, '
                             f'got {self.schedule!r}')
        if not self.max_guidance >= 0.0:
            raise ValueError(f'rtc max_guidance must be >= 0, got {self.max_guidance}')


def prefix_weights(horizon: int, delay: int, overlap: int, schedule: str = 'exp'
                   ) -> torch.Tensor:
    """(horizon,) float32 weight of the old chunk per new step: 1 for j < delay, decaying over
    delay <= j < overlap (the old chunk's remaining length), 0 from overlap on."""
    if schedule not in SCHEDULES:
        raise ValueError(f'schedule must be one of {list(SCHEDULES)}, got {schedule!r}')
    overlap = min(overlap, horizon)
    delay = min(delay, overlap)
    j = torch.arange(horizon, dtype=torch.float64)
    c = ((overlap - j) / (overlap - delay + 1)).clamp(0.0, 1.0)
    if schedule == 'exp':
        w = c * torch.expm1(c) / (math.e - 1.0)
    elif schedule == 'linear':
        w = c
    else:
        w = torch.full_like(c, 1.0 if schedule == 'ones' else 0.0)
    w = torch.where(j < overlap, w, torch.zeros_like(w))
    return torch.where(j < delay, torch.ones_like(w), w).float()


def guidance_weight(t: float, max_guidance: float) -> float:
    """The paper's min(beta, (1 - tau) / (tau r^2)), r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2),
    with tau = 1 - t (t = 1 is noise here): infinite at pure noise, hence the clip."""
    if t <= 0.0 or t >= 1.0:
        return max_guidance
    return min(max_guidance, (t * t + (1.0 - t) ** 2) / (t * (1.0 - t)))


@dataclass(frozen=True)
class RTCGuide:
    """One chunk's inpainting target, in model space.

    previous: (B, H, D) the old chunk's remaining actions on the new chunk's grid (zeros past
    its end); weights: (H,) per step (`prefix_weights`); delay: steps frozen to `previous`;
    dims: leading action dims constrained (the robot's; padded model dims stay free)."""

    previous: torch.Tensor
    weights: torch.Tensor
    delay: int
    dims: int
    max_guidance: float = DEFAULT_MAX_GUIDANCE

    @classmethod
    def build(cls, previous: torch.Tensor, delay: int, horizon: int, action_dim: int,
              config: RTCConfig | None = None, dims: int | None = None) -> RTCGuide:
        """previous (B, L, d <= action_dim) with L <= horizon: padded to (B, H, action_dim)."""
        config = config or RTCConfig()
        if previous.dim() != 3:
            raise ValueError(f'previous actions must be (B, L, D), got {tuple(previous.shape)}')
        b, length, d = previous.shape
        if length > horizon or d > action_dim:
            raise ValueError(f'previous actions {tuple(previous.shape)[1:]} exceed the chunk '
                             f'({horizon}, {action_dim})')
        if not 0 <= delay <= length:
            raise ValueError(f'inference delay must be in [0, {length}] (the previous actions '
                             f'left), got {delay}')
        padded = previous.new_zeros(b, horizon, action_dim, dtype=torch.float32)
        padded[:, :length, :d] = previous.float()
        return cls(padded, prefix_weights(horizon, delay, length, config.schedule), delay,
                   d if dims is None else dims, config.max_guidance)

    @property
    def guided(self) -> bool:
        return bool(self.weights[self.delay:].any()) and self.max_guidance > 0.0


def sample(velocity: Callable[[torch.Tensor, int], torch.Tensor], noise: torch.Tensor,
           steps: int, guide: RTCGuide) -> torch.Tensor:
    """Euler integration from t = 1 (noise (B, H, D)) to 0 of velocity(x_t, step) -> (B, H, D)
    with `guide`'s inpainting; the same grid as the plain samplers. Call it outside inference
    mode with a velocity whose tensors can be saved for backward (`autograd_ready`)."""
    x = noise
    dt = -1.0 / steps
    previous = guide.previous.to(x.device, x.dtype)
    d, k = guide.delay, guide.dims
    weights = guide.weights.to(x.device, x.dtype)[None, :, None] * \
        (torch.arange(x.shape[-1], device=x.device) < k).to(x.dtype)          # (1, H, D)
    guided = guide.guided
    x = _freeze(x, noise, previous, d, k, 1.0)
    for i, t in enumerate(flow_times(steps)):
        if guided:
            v = _guided_velocity(velocity, x, i, t, previous, weights, guide.max_guidance)
        else:
            with torch.no_grad():
                v = velocity(x, i)
        t_next = 1.0 - (i + 1) / steps
        x = _freeze(x + dt * v.to(x.dtype), noise, previous, d, k, t_next)
    return x


def _guided_velocity(velocity: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor,
                     i: int, t: float, previous: torch.Tensor, weights: torch.Tensor,
                     max_guidance: float) -> torch.Tensor:
    """v(x_t) - w(t) J^T (W * (Y - A_hat)), J = d A_hat / d x_t: the minus because this repo's
    velocity points from the data to the noise (the paper's points to the data)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        v = velocity(x_in, i).to(x.dtype)
        denoised = x_in - t * v                                               # A_hat (B, H, D)
        error = weights * (previous - denoised)
        (vjp,) = torch.autograd.grad(denoised, x_in, error)
    return v.detach() - guidance_weight(t, max_guidance) * vjp


def _freeze(x: torch.Tensor, noise: torch.Tensor, previous: torch.Tensor, delay: int,
            dims: int, t: float) -> torch.Tensor:
    """x with steps < delay (dims < dims) on the flow path at time t from noise to previous."""
    if delay == 0 or dims == 0:
        return x
    path = t * noise[:, :delay, :dims] + (1.0 - t) * previous[:, :delay, :dims] if t > 0.0 \
        else previous[:, :delay, :dims]
    x = x.clone()
    x[:, :delay, :dims] = path
    return x


def autograd_ready(obj: Any) -> Any:
    """`obj` (tensors, lists, tuples, dataclasses, `Dense`) with every inference tensor
    replaced by a normal copy, so that autograd may save it for backward. Call it outside
    inference mode (a clone inside it is another inference tensor)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(autograd_ready(o) for o in obj)
    if isinstance(obj, Dense):
        out = Dense.__new__(Dense)
        out.weight_t, out.bias = autograd_ready(obj.weight_t), autograd_ready(obj.bias)
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: autograd_ready(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj
