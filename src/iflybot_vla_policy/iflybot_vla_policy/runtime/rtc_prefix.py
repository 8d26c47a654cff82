"""What a real-time-chunking request carries (execution_strategy 'rtc', rtc.py): the executing
plan's remainder on the new chunk's time grid, and how many of its actions will have run before
the new chunk takes over (the inference delay, in actions).

The delay is estimated from the last chunks' measured observation-to-splice times on the node's
clock plus the commit latency, rounded up: too short a delay lets the new chunk rewrite actions
that already ran (a step at the splice), too long one only freezes more of the old chunk.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from iflybot_vla_policy.chunking import ChunkPlan

LATENCY_WINDOW = 8   # chunks whose observation-to-splice time sets the delay estimate


class RTCPrefix:
    def __init__(self, commit_latency_s: float) -> None:
        self.commit_latency_s = commit_latency_s
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def reset(self) -> None:
        self._latencies.clear()

    def spliced(self, t_obs: float, now: float) -> None:
        """A chunk observed at `t_obs` joined the plan at `now` (node clock)."""
        self._latencies.append(max(now - t_obs, 0.0))

    @property
    def delay_s(self) -> float:
        """Expected time from an observation until its chunk's commands act."""
        return max(self._latencies, default=0.0) + self.commit_latency_s

    def request(self, plan: ChunkPlan, t_obs: float, dt: float, horizon: int | None = None
                ) -> tuple[np.ndarray | None, int]:
        """(previous (L, d) or None, inference_delay): the plan's actions at t_obs + j dt for
        every j up to the plan's end (at most `horizon`), and the delay in actions (<= L)."""
        if plan.empty or plan.end < t_obs:
            return None, 0
        count = int(math.floor((plan.end - t_obs) / dt + 1e-9)) + 1
        if horizon is not None:
            count = min(count, horizon)
        previous = plan.at(t_obs + dt * np.arange(count))            # (L, d)
        delay = min(int(math.ceil(self.delay_s / dt - 1e-9)), count)
        return previous, delay
