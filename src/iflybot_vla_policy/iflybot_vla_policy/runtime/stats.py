"""What /vla/status and /diagnostics report: inference and image-to-trajectory latency, the
control timer's rate, jitter and missed ticks (on the node's clock)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from iflybot_vla_policy.eval.metrics import jitter, missed_ticks


@dataclass(frozen=True)
class StatusSnapshot:
    """The fields of iflybot_vla_msgs/PolicyStatus except the header (0.0: nothing measured)."""

    state: int
    instruction: str
    chunks_produced: int
    last_error: str
    missed_ticks: int
    inference_latency_p50_ms: float = 0.0
    inference_latency_p99_ms: float = 0.0
    control_rate_hz: float = 0.0
    control_jitter_p99_ms: float = 0.0
    e2e_latency_p50_ms: float = 0.0
    e2e_latency_p99_ms: float = 0.0
    observation_skew_p50_ms: float = 0.0
    observation_skew_max_ms: float = 0.0


class RuntimeStats:
    """Windows of recent measurements (ms) and the control ticks (node time, s)."""

    def __init__(self) -> None:
        self.inference_ms: deque[float] = deque(maxlen=200)
        self.e2e_latency_ms: deque[float] = deque(maxlen=200)   # image stamp -> publish
        self.round_trip_ms: deque[float] = deque(maxlen=200)    # remote backend
        self.skew_ms: deque[float] = deque(maxlen=200)   # spread of each observation's stamps
        self.tick_times: deque[float] = deque(maxlen=1000)
        self.missed_ticks = 0   # control ticks skipped while active

    def tick(self, now: float, active: bool, period: float) -> None:
        if self.tick_times and active:
            self.missed_ticks += missed_ticks([self.tick_times[-1], now], period)
        self.tick_times.append(now)

    def inference(self, latency_ms: float, round_trip_ms: float | None) -> None:
        self.inference_ms.append(latency_ms)
        if round_trip_ms is not None:
            self.round_trip_ms.append(float(round_trip_ms))

    def skew(self, skew_s: float) -> None:
        self.skew_ms.append(skew_s * 1e3)

    def e2e(self, published_at: float, obs_stamp: float) -> None:
        """Image stamp -> publish, both on the ROS clock; skipped when the stamps are on
        another clock (sim time without use_sim_time) or unknown."""
        latency = published_at - obs_stamp
        if obs_stamp > 0.0 and 0.0 <= latency < 60.0:
            self.e2e_latency_ms.append(latency * 1e3)

    def snapshot(self, period: float, **fields: object) -> StatusSnapshot:
        """`fields`: state, instruction, chunks_produced, last_error."""
        out: dict[str, float] = {}
        latencies = np.asarray(self.inference_ms, dtype=np.float64)
        if len(latencies):
            out['inference_latency_p50_ms'] = float(np.percentile(latencies, 50))
            out['inference_latency_p99_ms'] = float(np.percentile(latencies, 99))
        ticks = np.asarray(self.tick_times, dtype=np.float64)[-250:]
        if len(ticks) > 1 and ticks[-1] > ticks[0]:
            out['control_rate_hz'] = float((len(ticks) - 1) / (ticks[-1] - ticks[0]))
            out['control_jitter_p99_ms'] = jitter(ticks, period)['p99_ms']
        e2e = np.asarray(self.e2e_latency_ms, dtype=np.float64)
        if len(e2e):
            out['e2e_latency_p50_ms'] = float(np.percentile(e2e, 50))
            out['e2e_latency_p99_ms'] = float(np.percentile(e2e, 99))
        skew = np.asarray(self.skew_ms, dtype=np.float64)
        if len(skew):
            out['observation_skew_p50_ms'] = float(np.percentile(skew, 50))
            out['observation_skew_max_ms'] = float(skew.max())
        return StatusSnapshot(missed_ticks=self.missed_ticks, **fields, **out)

    def diagnostic_values(self) -> dict[str, str]:
        """p50 of the latency windows that have measurements, for /diagnostics."""
        values = {}
        for name, window in (('e2e_latency', self.e2e_latency_ms),
                             ('round_trip', self.round_trip_ms),
                             ('observation_skew', self.skew_ms)):
            if len(window):
                values[f'{name}_p50_ms'] = f'{np.percentile(list(window), 50):.1f}'
        return values
