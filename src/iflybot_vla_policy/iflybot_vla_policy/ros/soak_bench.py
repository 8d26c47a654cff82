"""Soak of the deployed sim graph (issue 27): `iflybot up sim` with the bundled policy running
back-to-back `~/run_policy` goals across the four tasks for a fixed wall time.

It reports what a long run would show and a short benchmark hides: goals run and succeeded,
holds by cause, nodes that exited during the run (the runner restarts none: a required node's
exit ends the graph, an optional one's is counted), the driver's liveness alarms that were a
stall rather than a death, anonymous resident memory of every node's process tree (the
policy's model child included) after the first goal, after one goal of every task (warmed up)
and at the end, and per time window the inference latency (from /vla/action_chunk), the
image-to-trajectory latency, control-timer jitter and missed ticks (from /vla/status) and the
machine's load. Run by
`iflybot bench --only soak --duration SECONDS`; the quick bench skips it (it needs minutes).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iflybot_vla_policy.ros.demo_driver import DemoDriver

TASKS = ('pick_place', 'stack', 'push', 'drawer')
SEED_OFFSET = 200          # held-out evaluation seeds from this index (past the bundle's eval)
MAX_GOAL_S = 20.0          # simulated seconds per goal, as `iflybot eval`'s default
RECOVER_S = 60.0           # wall seconds a silent policy gets to speak again before the soak ends
DEFAULT_DURATION_S = 1800.0
_STARTED = re.compile(r'started /(\S+) \(pid (\d+)\)')
_ENDED = re.compile(r'^\[up\s*\] (\S+) (exited|was killed by \S+)')   # once per node


@dataclass(frozen=True)
class GoalRecord:
    t: float              # wall seconds since the first goal started, at this goal's end
    task: str
    seed: int
    success: bool
    duration_s: float     # simulated
    reason: str
    load_1min: float = math.nan   # the machine's load average at the goal's end


@dataclass(frozen=True)
class StatusRecord:
    t: float
    state: int
    control_rate_hz: float
    control_jitter_p99_ms: float
    missed_ticks: int
    e2e_latency_p50_ms: float
    e2e_latency_p99_ms: float


class SoakDriver(DemoDriver):
    """The demo driver plus wall-clock times of every /vla/status and chunk latency."""

    def __init__(self) -> None:
        super().__init__(frame_every=10**9)
        self.origin = time.monotonic()
        self.statuses: list[StatusRecord] = []
        self.chunks: list[tuple[float, float]] = []     # (t, inference ms)
        self._soak_lock = threading.Lock()

    def _on_status(self, msg) -> None:
        super()._on_status(msg)
        with self._soak_lock:
            self.statuses.append(StatusRecord(
                time.monotonic() - self.origin, int(msg.state), float(msg.control_rate_hz),
                float(msg.control_jitter_p99_ms), int(msg.missed_ticks),
                float(msg.e2e_latency_p50_ms), float(msg.e2e_latency_p99_ms)))

    def _on_chunk(self, msg) -> None:
        super()._on_chunk(msg)
        with self._soak_lock:
            self.chunks.append((time.monotonic() - self.origin, float(msg.inference_latency_ms)))


# ------------------------------------------------------------------------------ processes

def node_pids(graph_log: str) -> dict[str, int]:
    """Node name -> pid, from `iflybot up`'s 'started /NAME (pid N)' lines."""
    return {m.group(1).rsplit('/', 1)[-1]: int(m.group(2))
            for m in _STARTED.finditer(graph_log)}


def node_endings(graph_log: str) -> list[str]:
    """The runner's lines about a node that exited or was killed (none in a healthy soak)."""
    return [line for line in graph_log.splitlines() if _ENDED.match(line)]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / 'stat').read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(')', 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_rss_mb(pid: int, tree: dict[int, list[int]] | None = None,
                field: str = 'RssAnon') -> float:
    """Resident memory (MB) of a process and its descendants; nan when it is gone.

    RssAnon by default: the heap, what a leak grows. VmRSS also counts file-backed pages
    (torch's libraries, mapped weights) that the kernel drops under memory pressure: on a
    shared machine it fell 30-50% in a run without any change in the nodes."""
    tree = _children() if tree is None else tree
    total, stack, found = 0.0, [pid], False
    while stack:
        current = stack.pop()
        try:
            for line in Path(f'/proc/{current}/status').read_text().splitlines():
                if line.startswith(f'{field}:'):
                    total += int(line.split()[1]) / 1024.0
                    found = True
        except OSError:
            continue
        stack.extend(tree.get(current, []))
    return total if found else math.nan


# ------------------------------------------------------------------------------ analysis

def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def window_summary(t0: float, t1: float, goals: Sequence[GoalRecord],
                   chunks: Sequence[tuple[float, float]],
                   statuses: Sequence[StatusRecord]) -> dict:
    """One time window [t0, t1): goals that ended in it, inference latency of its chunks, and
    the worst of what /vla/status said while running (its latencies and jitter are the node's
    own rolling p50/p99; missed ticks are counted since start, so the window's are a
    difference)."""
    g = [x for x in goals if t0 <= x.t < t1]
    ms = [v for t, v in chunks if t0 <= t < t1]
    s = [x for x in statuses if t0 <= x.t < t1]
    running = [x for x in s if x.state == 1 and x.control_rate_hz > 0]
    missed = (s[-1].missed_ticks - s[0].missed_ticks) if len(s) > 1 else 0
    return {
        'goals': len(g), 'succeeded': sum(x.success for x in g),
        'load_avg_1min_mean': round(float(np.mean([x.load_1min for x in g])), 2) if g
        else math.nan,
        'inference_ms_p50': _pct(ms, 50), 'inference_ms_p99': _pct(ms, 99), 'chunks': len(ms),
        'e2e_ms_p50': _pct([x.e2e_latency_p50_ms for x in running], 50),
        'e2e_ms_p99_max': max((x.e2e_latency_p99_ms for x in running), default=math.nan),
        'control_jitter_p99_ms_max': max((x.control_jitter_p99_ms for x in running),
                                         default=math.nan),
        'control_rate_hz_min': min((x.control_rate_hz for x in running), default=math.nan),
        'missed_ticks': missed}


def windows(duration: float, goals: Sequence[GoalRecord], chunks: Sequence[tuple[float, float]],
            statuses: Sequence[StatusRecord], count: int | None = None) -> dict[str, dict]:
    """The run cut into `count` equal windows (default: one per ~5 min, 2 to 6)."""
    if count is None:
        count = max(2, min(6, round(duration / 300.0)))
    edges = np.linspace(0.0, duration, count + 1)
    edges[-1] = math.inf      # the last goal ends after the duration: it counts in the last
    out = {}
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        label = f'{a:.0f}-{duration if math.isinf(b) else b:.0f}s'
        out[label] = window_summary(a, b, goals, chunks, statuses)
    return out


def rss_table(start: dict[str, float], end: dict[str, float]) -> dict[str, dict]:
    return {name: {'start_mb': round(start[name], 1), 'end_mb': round(end.get(name, math.nan), 1),
                   'growth_pct': round(100.0 * (end.get(name, math.nan) / start[name] - 1.0), 2)}
            for name in start}


# ------------------------------------------------------------------------------ the run

def _speaks_again(driver: SoakDriver, timeout: float) -> bool:
    """True once /vla/status arrives again within `timeout` wall seconds."""
    with driver._soak_lock:
        heard = len(driver.statuses)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with driver._soak_lock:
            if len(driver.statuses) > heard + 2:
                return True
        time.sleep(0.1)
    return False


def _graph_overrides(checkpoint: Path) -> list[str]:
    from iflybot_vla_policy.bundle import bundle_info

    overrides = [f'checkpoint:={checkpoint.resolve()}']
    camera = bundle_info(checkpoint).get('camera')
    if camera:
        overrides += [f'image_width:={camera["width"]}', f'image_height:={camera["height"]}']
    return overrides


def run(quick: bool = False, duration: float | None = None) -> dict:
    if duration is None:
        if quick:
            return {'skipped': 'the soak needs minutes: `iflybot bench --only soak --duration S`'}
        duration = DEFAULT_DURATION_S
    from iflybot_vla_policy.bundle import bundled_checkpoint
    from iflybot_vla_policy.eval.report import hold_category
    from iflybot_vla_policy.eval.through_ros import start_graph, stop_graph
    from iflybot_vla_policy.ros import demo_driver
    from iflybot_vla_policy.sim.tasks import EVAL_SEEDS

    checkpoint = bundled_checkpoint()
    if checkpoint is None:
        return {'skipped': 'no bundled checkpoint under checkpoints/'}
    work = Path(tempfile.mkdtemp(prefix='iflybot_soak_'))
    log = work / 'graph.log'
    overrides = _graph_overrides(checkpoint)
    load_start = os.getloadavg()
    proc = start_graph('sim', overrides, log)
    demo_driver.init()
    driver = SoakDriver()
    executor, _thread = demo_driver.spin_in_background(driver)
    goals: list[GoalRecord] = []
    rss_samples: list[tuple[float, dict[str, float]]] = []
    error, endings = '', []
    liveness_alarms: list[str] = []
    t_first = None

    def sample_rss() -> dict[str, float]:
        tree = _children()
        return {name: tree_rss_mb(pid, tree) for name, pid in node_pids(log.read_text()).items()}

    try:
        i = 0
        while t_first is None or time.monotonic() - t_first < duration:
            if proc.poll() is not None:
                raise RuntimeError(f'the node graph exited with code {proc.returncode}')
            task = TASKS[i % len(TASKS)]
            seed = EVAL_SEEDS[(SEED_OFFSET + i) % len(EVAL_SEEDS)]
            instruction = driver.reset(task, seed)
            if t_first is None:
                t_first = time.monotonic()
                driver.origin = t_first
            try:
                success, sim_s, reason = driver.run_policy(instruction, MAX_GOAL_S)
            except RuntimeError as exc:
                # The driver calls a policy that is silent for 5 s dead. A machine-wide stall
                # (a shared machine under memory pressure) silences a live node as long: that
                # is counted, and the soak goes on if the node speaks again.
                if proc.poll() is not None or not _speaks_again(driver, RECOVER_S):
                    raise
                liveness_alarms.append(f'{time.monotonic() - t_first:.0f} s: {exc}')
                print(f'[soak] liveness alarm, the policy spoke again: {exc}', flush=True)
                success, sim_s, reason = False, math.nan, f'liveness alarm: {exc}'
            now = time.monotonic() - t_first
            goals.append(GoalRecord(now, task, seed, success, sim_s, reason,
                                    os.getloadavg()[0]))
            rss_samples.append((now, sample_rss()))
            print(f'[soak] {now:7.1f} s goal {i + 1} {task} seed {seed}: '
                  f'{"success" if success else "failure"} ({sim_s:.1f} s sim)', flush=True)
            i += 1
    except (RuntimeError, TimeoutError) as exc:
        error = str(exc)
    finally:
        if t_first is not None:
            rss_samples.append((time.monotonic() - t_first, sample_rss()))
        endings = node_endings(log.read_text())     # before the shutdown's own exits
        graph_rc = stop_graph(proc)
        demo_driver.shutdown(driver, executor)
    wall = rss_samples[-1][0] if rss_samples else 0.0
    holds: dict[str, int] = {}
    for reason in driver.taps.holds:
        holds[hold_category(reason)] = holds.get(hold_category(reason), 0) + 1
    per_task = {t: f'{sum(g.success for g in goals if g.task == t)}/'
                   f'{sum(g.task == t for g in goals)}' for t in TASKS}
    ms = [v for _, v in driver.chunks]
    result = {
        'graph': 'iflybot up sim ' + ' '.join(overrides), 'duration_s': duration,
        'goals_wall_s': round(wall, 1), 'goals_run': len(goals),
        'goals_succeeded': sum(g.success for g in goals), 'per_task': per_task,
        'holds_by_cause': holds or {'none': 0},
        # the runner restarts no node: one that ended during the run is counted here
        'node_exits_during_run': len(endings), 'graph_exit_status': graph_rc,
        'liveness_alarms': len(liveness_alarms),
        'rss_anon': rss_table(rss_samples[0][1], rss_samples[-1][1]) if rss_samples else {},
        # The simulator builds a task's scene the first time it is drawn, and the policy's
        # allocator settles over the first goals: growth from after one goal of every task
        # is what a leak would show.
        'rss_anon_after_warmup': (rss_table(rss_samples[len(TASKS) - 1][1], rss_samples[-1][1])
                                  if len(rss_samples) > len(TASKS) else {}),
        'inference_ms_p50': _pct(ms, 50), 'inference_ms_p99': _pct(ms, 99), 'chunks': len(ms),
        'windows': windows(max(wall, 1.0), goals, driver.chunks, driver.statuses),
        'load_avg_1min_start_end': [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        'cores': os.cpu_count(), 'graph_log': str(log), 'error': error or 'none'}
    if endings:
        result['node_exits'] = endings
    if liveness_alarms:
        result['liveness_alarm_log'] = liveness_alarms
    return result
