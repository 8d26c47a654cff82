"""Evaluation reports: per-task aggregates, report.json, report.md, plots and rollout videos."""
from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from iflybot_vla_policy.eval.metrics import percentile, wilson_interval


@dataclass
class EpisodeResult:
    """What one closed-loop rollout measured."""

    task: str
    seed: int
    instruction: str
    success: bool
    duration_s: float                   # simulated seconds until success or timeout
    time_to_success_s: float | None
    inference_ms: list[float] = field(default_factory=list)
    control_jitter_p99_ms: float = math.nan
    rms_jerk: float = math.nan          # rad/s^3 of the measured arm joints
    limit_violations: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    video: str | None = None
    hold_reasons: dict[str, int] = field(default_factory=dict)  # reason (numbers as N) -> count
    # TCP minus the named object (base frame, m) at the first close command; None: never closed
    grasp_offset_m: list[float] | None = None
    # False where the offset cannot be known: tasks without a grasp, runs through ROS (the
    # object poses are not published)
    grasp_measured: bool = True
    # through ROS, from /vla/status while running: control timer rate (lowest window, Hz),
    # timer jitter p99 and image-stamp-to-trajectory p99 (highest windows, ms, node clock),
    # and simulated over wall seconds of the run
    control_rate_hz_min: float = math.nan
    timer_jitter_p99_ms: float = math.nan
    e2e_latency_p99_ms: float = math.nan
    real_time_factor: float = math.nan
    # libfranka error name -> count: the simulator's checks of the 1 kHz command stream against
    # the FR3's limits (sim/trajectory.py CommandMonitor); the real arm aborts on each
    reflexes: dict[str, int] = field(default_factory=dict)


def hold_category(reason: str) -> str:
    """A safety filter reason with its numbers replaced by N, so equal causes count together."""
    return re.sub(r'-?\d+(\.\d+)?', 'N', reason)


def summarize(episodes: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Per-task aggregates with Wilson 95% intervals; keys are task names plus 'overall'."""
    tasks = sorted({e.task for e in episodes})
    summary: dict[str, Any] = {}
    for name in [*tasks, 'overall']:
        group = [e for e in episodes if name == 'overall' or e.task == name]
        if not group:
            continue
        wins = sum(e.success for e in group)
        low, high = wilson_interval(wins, len(group))
        latencies = [ms for e in group for ms in e.inference_ms]
        times = [e.time_to_success_s for e in group if e.time_to_success_s is not None]
        grasp_xy = [math.hypot(*e.grasp_offset_m[:2]) for e in group
                    if e.grasp_offset_m is not None]
        violations: dict[str, int] = {}
        reflexes: dict[str, int] = {}
        for e in group:
            for key, count in e.limit_violations.items():
                violations[key] = violations.get(key, 0) + count
            for key, count in e.reflexes.items():
                reflexes[key] = reflexes.get(key, 0) + count
        summary[name] = {
            'episodes': len(group), 'successes': wins, 'success_rate': wins / len(group),
            'success_ci95': [low, high],
            'time_to_success_s_mean': float(np.mean(times)) if times else math.nan,
            'inference_latency_ms_p50': percentile(latencies, 50),
            'inference_latency_ms_p99': percentile(latencies, 99),
            'control_jitter_p99_ms': _nanmax([e.control_jitter_p99_ms for e in group]),
            'rms_jerk_mean': _nanmean([e.rms_jerk for e in group]),
            'control_rate_hz_min': _nanmin([e.control_rate_hz_min for e in group]),
            'timer_jitter_p99_ms': _nanmax([e.timer_jitter_p99_ms for e in group]),
            'e2e_latency_p99_ms': _nanmax([e.e2e_latency_p99_ms for e in group]),
            'real_time_factor_mean': _nanmean([e.real_time_factor for e in group]),
            'episodes_with_stale_input_holds': sum(
                any(k.startswith('stale input') for k in e.hold_reasons) for e in group),
            'limit_violations': violations,
            'reflexes': reflexes,
            'episodes_with_reflexes': sum(bool(e.reflexes) for e in group),
            'grasp_attempts': len(grasp_xy),
            'grasp_xy_error_m_median': float(np.median(grasp_xy)) if grasp_xy else math.nan,
        }
    return summary


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _nanmin(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.min(finite)) if finite else math.nan


def _nanmax(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.max(finite)) if finite else math.nan


def _fmt(value: float, digits: int = 1, scale: float = 1.0) -> str:
    return 'n/a' if value is None or math.isnan(value) else f'{value * scale:.{digits}f}'


def write_report(out_dir: Path, episodes: Sequence[EpisodeResult],
                 meta: dict[str, Any]) -> dict[str, Any]:
    """Write report.json and report.md, then try a success plot; returns the JSON document."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(episodes)
    doc = {'meta': meta, 'tasks': {k: v for k, v in summary.items() if k != 'overall'},
           'overall': summary.get('overall', {}), 'episodes': [asdict(e) for e in episodes]}
    (out_dir / 'report.json').write_text(json.dumps(doc, indent=2, default=_json_default) + '\n')
    lines = ['# Closed-loop evaluation', '']
    lines += [f'- {k}: {v}' for k, v in meta.items()]
    lines += ['', '| task | success | 95% CI | time to success (s) | latency p50/p99 (ms) | '
              'jitter p99 (ms) | RMS jerk (rad/s³) | limit violations | safety holds | '
              'reflexes (episodes) |',
              '|---|---|---|---|---|---|---|---|---|---|']
    for name, row in summary.items():
        low, high = row['success_ci95']
        counts = row['limit_violations']
        violations = sum(v for k, v in counts.items() if k != 'safety_holds')
        lines.append(
            f"| {name} | {row['successes']}/{row['episodes']} ({row['success_rate']:.0%}) | "
            f'{low:.0%}–{high:.0%} | {_fmt(row["time_to_success_s_mean"])} | '
            f'{_fmt(row["inference_latency_ms_p50"])} / {_fmt(row["inference_latency_ms_p99"])}'
            f' | {_fmt(row["control_jitter_p99_ms"], 2)} | {_fmt(row["rms_jerk_mean"], 2)} | '
            f'{violations} | {counts.get("safety_holds", 0)} | '
            f'{sum(row["reflexes"].values())} ({row["episodes_with_reflexes"]}) |')
    lines += ['', '## Episodes', '',
              'Grasp offset: TCP minus the named object (x, y, z in the base frame, cm) when the '
              'gripper was first told to close.', '',
              '| task | seed | success | duration (s) | grasp offset (cm) | instruction |',
              '|---|---|---|---|---|---|']
    lines += [f'| {e.task} | {e.seed} | {"yes" if e.success else "no"} | '
              f'{e.duration_s:.1f} | {_fmt_offset(e)} | {e.instruction} |'
              for e in episodes]
    holds = Counter()
    for e in episodes:
        holds.update(e.hold_reasons)
    if holds:
        lines += ['', '## Why the safety filter held', '', '| reason | chunks held |', '|---|---|']
        lines += [f'| {reason} | {count} |' for reason, count in holds.most_common()]
    # The results are on disk before any plot is tried, and a plot that fails (matplotlib
    # missing, a backend error, a value it refuses) costs only the figure, never the report.
    (out_dir / 'report.md').write_text('\n'.join(lines) + '\n')
    plot = out_dir / 'success.png'
    plot.unlink(missing_ok=True)            # a figure left from an earlier run would mislead
    try:
        plotted = _plot_success(plot, summary)
    except Exception as exc:  # noqa: BLE001 - any plotting failure is reported, not raised
        print(f'warning: {plot} not drawn ({type(exc).__name__}: {exc}); the results are in '
              f'{out_dir / "report.json"}', file=sys.stderr)
        plot.unlink(missing_ok=True)
        plotted = False
    if plotted:
        lines += ['', '![success per task](success.png)']
        (out_dir / 'report.md').write_text('\n'.join(lines) + '\n')
    return doc


def _fmt_offset(episode: EpisodeResult) -> str:
    if not episode.grasp_measured:
        return 'not measured'
    offset = episode.grasp_offset_m
    return 'never closed' if offset is None else ', '.join(f'{100 * v:+.1f}' for v in offset)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f'not JSON serialisable: {type(value).__name__}')


def _plot_success(path: Path, summary: dict[str, Any]) -> bool:
    """Bar chart of success rate per task with the Wilson interval as error bars."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = [n for n in summary if n != 'overall']
    if not names:
        return False
    rates = np.array([summary[n]['success_rate'] for n in names])
    ci = np.array([summary[n]['success_ci95'] for n in names])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.2))
    errors = np.clip([rates - ci[:, 0], ci[:, 1] - rates], 0.0, None)   # rounding: never < 0
    ax.bar(names, rates, yerr=errors, capsize=4, color='#4c72b0')
    ax.set_ylim(0, 1.05)
    ax.set_ylabel('success rate')
    ax.set_title('closed-loop success (Wilson 95% CI)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float) -> None:
    """Encode (H, W, 3) uint8 RGB frames as an H.264 MP4 with PyAV."""
    import av

    if not frames:
        raise ValueError(f'no frames for {path}')
    height, width = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode='w') as container:
        stream = container.add_stream('libx264', rate=int(round(fps)))
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = 'yuv420p'
        for frame in frames:
            image = np.ascontiguousarray(frame[:stream.height, :stream.width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format='rgb24')):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
