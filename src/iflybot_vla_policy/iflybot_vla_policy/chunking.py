"""Executing action chunks on a time base and splicing in new ones while the robot keeps moving.

A chunk computed from an observation taken at `t_obs` arrives at `now = t_obs + delay`. How the
new chunk replaces the one being executed is the strategy:

- `blend`: real-time chunking's soft mask applied at the output (after Black et al., arXiv
  2506.07339). Actions the robot executes before the new command can take effect (up to
  `now + commit_latency`) are frozen; over the rest of the old chunk the old actions are
  blended out with the mask w(c) (a smoothstep by default; the paper's c (e^c - 1) / (e - 1)
  with `blend_schedule='exp'`). It had the lower jerk with the bundled policy
  (docs/realtime.md), so it is the default.
- `rtc`: real-time chunking as the paper does it, inside the flow denoiser (rtc.py): the
  request carries the executing chunk's remainder (runtime/rtc_prefix.py), the policy freezes
  the actions that run during the inference delay and guides the overlap, and the new chunk
  replaces the old one from its observation on.
- `ensemble`: temporal ensembling as in ACT (Zhao et al. 2023): every time step averages all
  chunks that cover it with weights exp(-m i), i = 0 for the oldest.
- `naive`: the new chunk replaces the old one from `now` on.

`ChunkPlan` holds the blended reference (any action layout); `ChunkExecutor` turns it into the
joint trajectory to publish, through the safety filter: continuous with the current command,
within the limits, ending at rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from iflybot_vla_policy.safety import SafetyFilter, Trajectory, non_finite_reason

STRATEGIES = ('blend', 'rtc', 'ensemble', 'naive')


@dataclass(frozen=True)
class ExecutionConfig:
    strategy: str = 'blend'
    commit_latency: float = 0.05   # s from splice until the new command acts (frozen by blend
                                   # and rtc)
    ensemble_decay: float = 0.01   # ACT's m: weight exp(-m i) of the i-th oldest chunk
    max_chunks: int = 8            # chunks kept for ensembling
    blend_schedule: str = 'smooth'   # blend: the old chunk's weight decay, smooth | exp (paper)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f'unknown execution strategy {self.strategy!r}; '
                             f'choose from {list(STRATEGIES)}')
        if not self.commit_latency >= 0.0:
            raise ValueError(f'commit_latency must be >= 0, got {self.commit_latency}')
        if not self.ensemble_decay >= 0.0:
            raise ValueError(f'ensemble_decay must be >= 0, got {self.ensemble_decay}')
        if self.blend_schedule not in ('smooth', 'exp'):
            raise ValueError(f"blend_schedule must be 'smooth' or 'exp', "
                             f'got {self.blend_schedule!r}')
        if self.max_chunks < 1:
            raise ValueError(f'max_chunks must be >= 1, got {self.max_chunks}')


def blend_weights(t: np.ndarray, freeze_until: float, old_end: float,
                schedule: str = 'smooth') -> np.ndarray:
    """Weight (t.shape) of the old chunk: 1 while frozen, decaying to 0 at the old chunk's end.

    c runs from 1 at the end of the frozen part to 0 at the old chunk's end. 'exp' is the
    paper's soft mask c (e^c - 1) / (e - 1); its slope at c = 1 puts a velocity kink into an
    output-level blend, so the default 'smooth' uses c^2 (3 - 2c), flat at both ends.
    """
    t = np.asarray(t, dtype=np.float64)
    span = max(old_end - freeze_until, 1e-9)
    c = np.clip((old_end - t) / span, 0.0, 1.0)
    if schedule == 'exp':
        w = c * (np.exp(c) - 1.0) / (math.e - 1.0)
    else:
        w = c * c * (3.0 - 2.0 * c)
    return np.where(t < freeze_until, 1.0, w)


class _Chunk:
    """One chunk on the absolute time base: times (h,), values (h, d)."""

    def __init__(self, times: np.ndarray, values: np.ndarray) -> None:
        self.times = times
        self.values = values

    @property
    def start(self) -> float:
        return float(self.times[0])

    @property
    def end(self) -> float:
        return float(self.times[-1])

    def at(self, t: np.ndarray) -> np.ndarray:
        """Catmull-Rom interpolation (C1: no velocity steps between actions), held constant
        outside; t: (k,) -> (k, d)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        times, values = self.times, self.values
        if len(times) == 1:
            return np.repeat(values, len(t), axis=0)
        tangents = np.gradient(values, times, axis=0)             # (h, d), per second
        tangents[[0, -1]] = 0.0 if len(times) == 2 else tangents[[0, -1]]
        tc = np.clip(t, times[0], times[-1])
        i = np.clip(np.searchsorted(times, tc, side='right') - 1, 0, len(times) - 2)
        h = (times[i + 1] - times[i])[:, None]
        s = (tc - times[i])[:, None] / h
        h00, h10 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s
        h01, h11 = -2 * s**3 + 3 * s**2, s**3 - s**2
        return (h00 * values[i] + h10 * h * tangents[i] + h01 * values[i + 1]
                + h11 * h * tangents[i + 1])


class ChunkPlan:
    """The reference being executed, updated by splicing in new chunks with one strategy."""

    def __init__(self, config: ExecutionConfig | None = None) -> None:
        self.config = config or ExecutionConfig()
        self._plan: _Chunk | None = None
        self._history: list[_Chunk] = []

    def clear(self) -> None:
        self._plan = None
        self._history.clear()

    @property
    def empty(self) -> bool:
        return self._plan is None

    @property
    def end(self) -> float:
        return -math.inf if self._plan is None else self._plan.end

    @property
    def times(self) -> np.ndarray:
        return np.zeros(0) if self._plan is None else self._plan.times

    @property
    def values(self) -> np.ndarray | None:
        return None if self._plan is None else self._plan.values

    def at(self, t: float | np.ndarray) -> np.ndarray | None:
        """Reference at absolute time(s) t: (d,) for a scalar, (k, d) for an array."""
        if self._plan is None:
            return None
        out = self._plan.at(t)
        return out[0] if np.ndim(t) == 0 else out

    def splice(self, values: np.ndarray, dt: float, t_obs: float, now: float) -> None:
        """Merge a chunk (h, d) whose first action belongs to time t_obs, at time now."""
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or len(values) == 0:
            raise ValueError(f'chunk must be (horizon, dim), got {values.shape}')
        if not dt > 0.0:
            raise ValueError(f'dt must be positive, got {dt}')
        new = _Chunk(t_obs + np.arange(len(values)) * dt, values)
        old = self._plan
        if old is not None and old.values.shape[1] != values.shape[1]:
            raise ValueError(f"chunk dim {values.shape[1]} differs from the plan's "
                             f'{old.values.shape[1]}')
        strategy = self.config.strategy
        if strategy == 'ensemble':
            self._plan = self._ensemble(new, now)
        elif strategy in ('naive', 'rtc') or old is None or old.end <= now:
            self._plan = new     # rtc: the policy already continued the old chunk
        else:   # blend
            w = blend_weights(new.times, now + self.config.commit_latency, old.end,
                              self.config.blend_schedule)[:, None]
            self._plan = _Chunk(new.times, w * old.at(new.times) + (1.0 - w) * values)

    def _ensemble(self, new: _Chunk, now: float) -> _Chunk:
        """ACT's temporal ensemble of the chunks still covering the future, on new's grid."""
        self._history = [c for c in self._history if c.end > now]
        self._history = self._history[-(self.config.max_chunks - 1):] + [new]
        total = np.zeros_like(new.values)
        weight_sum = np.zeros((len(new.values), 1))
        for i, chunk in enumerate(self._history):   # i = 0: oldest
            covers = ((new.times >= chunk.start - 1e-9)
                      & (new.times <= chunk.end + 1e-9))[:, None]
            w = math.exp(-self.config.ensemble_decay * i) * covers
            total += w * chunk.at(new.times)
            weight_sum += w
        return _Chunk(new.times, total / weight_sum)


class ChunkExecutor:
    """Joint mode: keeps the commanded trajectory and builds the next one on every new chunk.

    Chunk values are (horizon, n_joints + 1): arm targets and gripper width. All times are in
    the caller's clock (seconds, e.g. time.monotonic()).
    """

    def __init__(self, safety: SafetyFilter, config: ExecutionConfig | None = None) -> None:
        self.safety = safety
        self.plan = ChunkPlan(config)
        self.n = safety.robot.n_joints
        self._command: Trajectory | None = None

    @property
    def command(self) -> Trajectory | None:
        """The trajectory last produced (what the controller is executing)."""
        return self._command

    def reset(self, q: np.ndarray, now: float) -> None:
        """Forget everything; the command becomes `q` at rest (e.g. on activation)."""
        self.plan.clear()
        self._command = self.safety.hold(np.asarray(q, dtype=np.float64), np.zeros(self.n),
                                         start=now)

    def commanded(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Commanded position and velocity (n_joints,) at absolute time t."""
        if self._command is None:
            raise RuntimeError('ChunkExecutor.reset() must be called before use')
        return self._command.sample(t)

    def gripper_at(self, t: float) -> float | None:
        ref = self.plan.at(t)
        return None if ref is None else float(ref[self.n])

    def splice(self, values: np.ndarray, dt: float, t_obs: float,
               now: float) -> tuple[Trajectory, str]:
        """Merge a vetted chunk and return (trajectory to publish, hold reason or '')."""
        self.plan.splice(values, dt, t_obs, now)
        p0, v0 = self.commanded(now)
        h = self.safety.knot_step(dt)
        steps = max(1, int(math.floor((self.plan.end - now) / h + 1e-9)))
        reference = self.plan.at(now + h * np.arange(1, steps + 1))[:, :self.n]   # (steps, n)
        reason = non_finite_reason(reference, 'reference')
        if reason:
            return self.hold(now), reason
        trajectory = self.safety.track(p0, v0, reference, h, start=now)
        reason = self.safety.verify(trajectory, p0, v0)
        if reason:
            return self.hold(now), reason
        self._command = trajectory
        return trajectory, ''

    def hold(self, now: float) -> Trajectory:
        """Brake from the current command to rest and drop the plan."""
        p0, v0 = self.commanded(now)
        self.plan.clear()
        self._command = self.safety.hold(p0, v0, start=now)
        return self._command
