"""When to ask the model for the next chunk.

A chunk is requested when every camera has a new frame, not at the next control tick: the
frame's age at the request adds to the image-to-trajectory latency. The cadence follows the
frames' own times, so a request made late (worker busy) does not push the next one off its
frame; a request may come REQUEST_SLACK_S early so that frame jitter does not push it to the
frame after. A policy server that asked to be left alone (its retry backoff) is not asked
before its deadline.
"""
from __future__ import annotations

import math

REQUEST_SLACK_S = 0.02


class RequestScheduler:
    def __init__(self, rate_hz: float) -> None:
        self.period = 1.0 / rate_hz
        self._last_frame_time = -math.inf
        self._retry_at = -math.inf

    def reset(self) -> None:
        """A new run or instruction: the next complete frame set is requested at once."""
        self._last_frame_time = self._retry_at = -math.inf

    def back_off(self, until: float) -> None:
        self._retry_at = until

    def due(self, now: float, frame_time: float) -> bool:
        """Whether a complete observation whose frames are of `frame_time` may be requested."""
        slack = min(REQUEST_SLACK_S, self.period / 4)
        return now >= self._retry_at and frame_time - self._last_frame_time >= self.period - slack

    def submitted(self, frame_time: float) -> None:
        self._last_frame_time = frame_time
