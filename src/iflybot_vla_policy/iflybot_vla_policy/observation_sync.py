"""Time-aligned observations: one rule for the policy node and for bag-to-dataset conversion.

An observation is the camera frames and the joint state nearest to one reference stamp. Its
skew is the largest distance of a chosen stamp from the reference; above the limit the inputs
do not belong to the same moment and the observation is refused. The default limit is set by
the camera period: two free-running cameras at one rate are up to half a period apart, and
SKEW_FRACTION leaves one more period for delivery jitter (3/4 of a period held a loaded 2-core
CI machine's test graphs at 75-100 ms skews, in sync but late).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SKEW_FRACTION = 1.5


def nearest_index(stamps: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Index (len(t),) of the stamp nearest to each t in sorted `stamps` (n,); ties go early."""
    stamps = np.asarray(stamps, dtype=np.float64)
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    if len(stamps) == 0:
        raise ValueError('nearest_index needs at least one stamp')
    if len(stamps) == 1:
        return np.zeros(len(t), dtype=np.int64)
    right = np.clip(np.searchsorted(stamps, t), 1, len(stamps) - 1)
    left = right - 1
    return np.where(np.abs(stamps[left] - t) <= np.abs(stamps[right] - t), left, right)


def frame_period(stamps: Sequence[float] | np.ndarray) -> float:
    """Median interval (s) of sorted stamps; nan with fewer than two."""
    diffs = np.diff(np.asarray(stamps, dtype=np.float64))
    diffs = diffs[diffs > 0]
    return float(np.median(diffs)) if len(diffs) else math.nan


def skew_limit(period: float, limit: float = 0.0) -> float:
    """The skew allowed: `limit` when positive, else SKEW_FRACTION of the camera period (inf
    while the period is unknown)."""
    if limit > 0:
        return limit
    return SKEW_FRACTION * period if math.isfinite(period) and period > 0 else math.inf


@dataclass(frozen=True)
class Alignment:
    reference: float            # the stamp the observation belongs to
    picks: dict[str, int]       # input -> index of its chosen sample
    offsets: dict[str, float]   # input -> chosen stamp - reference (s)

    @property
    def skew(self) -> float:
        return max((abs(o) for o in self.offsets.values()), default=0.0)

    @property
    def worst(self) -> str:
        """The input furthest from the reference."""
        return max(self.offsets, key=lambda k: abs(self.offsets[k]))

    def describe(self, limit: float, why: str = '') -> str:
        """The hold reason; `why`: what is known of the worst input (a refused message)."""
        worst = self.worst
        return (f'observation out of sync: {worst} {self.offsets[worst] * 1e3:+.1f} ms from the '
                f'frames (limit {limit * 1e3:.1f} ms{"; " + why if why else ""})')


def align(streams: Mapping[str, Sequence[float] | np.ndarray], reference: float) -> Alignment:
    """The sample of each input (sorted stamps) nearest to `reference`."""
    picks, offsets = {}, {}
    for name, stamps in streams.items():
        stamps = np.asarray(stamps, dtype=np.float64)
        i = int(nearest_index(stamps, np.array([reference]))[0])
        picks[name], offsets[name] = i, float(stamps[i] - reference)
    return Alignment(reference, picks, offsets)
