"""Which inputs the runtime may plan from: ages, stamps, new frames, and the start of a run.

Three races shaped this module, each seen through ROS on a loaded 2-core machine:
- joint states sent before a simulator reset arrived after the next goal began, and the run
  planned from the old pose (`inputs_after`: only inputs stamped at or after it count);
- a goal landed while the reset's joint state was in flight (without `inputs_after`, a run
  waits for inputs that *arrived* after it began);
- the simulator's task_success=True of the episode before the reset ended the next goal
  (`SuccessLatch`: a True counts only after a False seen during the goal).
Times: `now` is the node's clock (the controller's, sim time under use_sim_time), stamps are
the messages' header stamps in seconds.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from iflybot_vla_policy.observation_sync import Alignment, align, frame_period
from iflybot_vla_policy.safety import Watchdog

JOINT_STATES = 'joint_states'
# Stamps up to this far (s) ahead of the node's clock are on its clock with the clock message
# still queued behind them (0.11 s seen on a loaded 2-core machine); further apart, they are on
# another clock.
MAX_CLOCK_LAG_S = 0.5
# A joint state this far (s) behind the frames is on another clock: no use waiting for a newer one.
STATE_OTHER_CLOCK_S = 0.5
# How long (s) past the frames' stamp the node's clock waits for the joint state of their instant.
STATE_WAIT_S = 0.1
FRAME_HISTORY = 4     # frames kept per camera for time alignment
JOINT_HISTORY = 256   # joint states kept (0.26 s at 1 kHz, 2.6 s at 100 Hz)


@dataclass(frozen=True)
class JointSample:
    q: np.ndarray      # (n_joints,) float64 arm positions, finite
    width: float       # gripper opening, m
    stamp: float       # header stamp, s

    def state(self) -> np.ndarray:
        """The model's state vector (n_joints + 1,) float32."""
        return np.append(self.q, self.width).astype(np.float32)


class InputTracker:
    """The newest joint sample and camera frames (as given: decoded later, off the executor
    thread), their ages for the watchdog, and the frames counted per camera since the last
    request (counted, not compared by stamp: some drivers do not stamp their images)."""

    def __init__(self, cameras: tuple[str, ...], joint_state_timeout: float,
                 camera_timeout: float) -> None:
        self.cameras = cameras
        self.watchdog = Watchdog({JOINT_STATES: joint_state_timeout,
                                  **{c: camera_timeout for c in cameras}})
        self.joint: JointSample | None = None
        self.images: dict[str, Any] = {}
        self._stamps: dict[str, float] = {}
        self._frame_times: dict[str, float] = {}   # header stamp, or arrival if unstamped
        self._frames: dict[str, int] = {}
        self._frames_used: dict[str, int] = {}
        self._refused: dict[str, str] = {}   # input -> why its last message was refused
        self.run_start: float | None = None   # a run waits for inputs that arrived after this
        self.inputs_after = 0.0               # ... or, when > 0, stamped at or after this
        # Recent samples, oldest first, for time-aligned observations (observation_sync).
        self._frame_history: dict[str, deque[tuple[float, Any]]] = {
            c: deque(maxlen=FRAME_HISTORY) for c in cameras}
        self._joint_history: deque[JointSample] = deque(maxlen=JOINT_HISTORY)

    def image(self, name: str, payload: Any, stamp: float, now: float) -> None:
        self.images[name] = payload
        self._frames[name] = self._frames.get(name, 0) + 1
        self._stamps[name] = stamp
        self._frame_times[name] = stamp or now
        history = self._frame_history.setdefault(name, deque(maxlen=FRAME_HISTORY))
        if history and stamp and stamp < history[-1][0]:
            history.clear()    # the clock went back (a simulator restarted): a new timeline
        history.append((stamp or now, payload))
        self.watchdog.feed(name, now)

    def joint_state(self, sample: JointSample, now: float) -> None:
        self.joint = sample
        if self._joint_history and sample.stamp < self._joint_history[-1].stamp:
            self._joint_history.clear()
        self._joint_history.append(sample)
        self._refused.pop(JOINT_STATES, None)
        self.watchdog.feed(JOINT_STATES, now)

    def refused_reason(self, name: str) -> str:
        """Why the last message of input `name` was refused ('' if it was not)."""
        reason = self._refused.get(name, '')
        return f'{name} refused: {reason}' if reason else ''

    def refused(self, name: str, reason: str) -> None:
        """A message of input `name` could not be used (a renamed joint, a NaN): it feeds
        nothing, and the hold that follows names why."""
        self._refused[name] = reason

    def stale_reason(self, now: float) -> str:
        """'' when every input is fresh; else which are stale, and why their last message was
        refused where it was."""
        reason = self.watchdog.stale_reason(now)
        refused = [f'{name} refused: {why}' for name, why in self._refused.items()
                   if self.watchdog.age(name, now) > self.watchdog.timeouts[name]]
        return f'{reason} ({"; ".join(refused)})' if reason and refused else reason

    # -------------------------------------------------------------------- frames
    def fresh_frames(self) -> bool:
        """Every camera has a frame newer than those of the last request."""
        return all(self._frames.get(c, 0) > self._frames_used.get(c, 0) for c in self.cameras)

    def frame_time(self) -> float:
        """Time of the oldest newest frame: when the observation became complete."""
        return min(self._frame_times.get(c, -math.inf) for c in self.cameras)

    def obs_stamp(self) -> float:
        """Oldest image stamp of the observation (0 if unknown)."""
        return min(self._stamps.get(c, 0.0) for c in self.cameras)

    def obs_time(self, now: float) -> float:
        """When the observation was taken on the node's clock: `now`, or the frames' stamp
        when the clock lags frames it already holds (a lockstep run then plans the same chunk
        wherever the /clock message landed in the executor's queue)."""
        ahead = self.obs_stamp() - now
        return now + ahead if 0.0 < ahead < MAX_CLOCK_LAG_S else now

    def state_caught_up(self, now: float) -> bool:
        """The joint state is not older than the frames: a simulator publishes both at one
        instant, and planning on a state from before (its message queued behind the images)
        made lockstep runs differ. It is waited for while the node's clock is within
        behind them by up to MAX_CLOCK_LAG_S or past them by less than STATE_WAIT_S (a stopped
        lockstep clock stays there until it comes); a state stream that lags further, or one
        STATE_OTHER_CLOCK_S behind, is not waited for: the watchdog judges it."""
        if self.joint is None:
            return False
        behind = self.obs_stamp() - self.joint.stamp
        waiting = 0.0 < behind < STATE_OTHER_CLOCK_S and \
            -MAX_CLOCK_LAG_S < now - self.obs_stamp() < STATE_WAIT_S
        return not waiting

    def camera_period(self) -> float:
        """The slowest camera's median frame interval over the history (nan if unknown)."""
        periods = [frame_period([t for t, _ in self._frame_history.get(c, ())])
                   for c in self.cameras]
        known = [p for p in periods if math.isfinite(p)]
        return max(known) if known else math.nan

    def observation(self) -> tuple[dict[str, Any], JointSample, Alignment]:
        """The frames and joint state nearest to the newest complete frame set's stamp (the
        oldest of the cameras' newest frames), and how far apart they are."""
        reference = self.frame_time()
        streams = {c: [t for t, _ in self._frame_history[c]] for c in self.cameras}
        joints = [j for j in self._joint_history if j.stamp > 0]
        if joints and abs(joints[-1].stamp - reference) >= STATE_OTHER_CLOCK_S:
            joints = []    # stamped on another clock (or unstamped): nothing to align to
        if joints:
            streams[JOINT_STATES] = [j.stamp for j in joints]
        alignment = align(streams, reference)
        images = {c: self._frame_history[c][alignment.picks[c]][1] for c in self.cameras}
        joint = joints[alignment.picks[JOINT_STATES]] if joints else self.joint
        return images, joint, alignment

    def mark_used(self) -> None:
        self._frames_used = dict(self._frames)

    # -------------------------------------------------------------------- run start
    def begin_run(self, now: float) -> None:
        self.run_start = now

    @property
    def run_pending(self) -> bool:
        return self.run_start is not None

    def run_inputs_ready(self) -> bool:
        """Whether a pending run may start: with inputs_after the stamps decide (a lockstep
        simulator's clock stands still, so nothing arrives 'after' on it); without, arrival
        after the run began does. Clears the pending run when true."""
        if self.inputs_after > 0:
            ready = self._stamped_after(self.inputs_after)
        else:
            ready = self.watchdog.fed_since(self.run_start)
        if ready:
            self.run_start, self.inputs_after = None, 0.0
        return ready

    def _stamped_after(self, t: float) -> bool:
        if self.joint is None:
            return False
        stamps = [self.joint.stamp, *(self._stamps.get(c, -math.inf) for c in self.cameras)]
        return min(stamps) >= t


class SuccessLatch:
    """task_success for one goal: a True counts only after a False received during the goal,
    so a True still queued from the episode before the simulator's reset does not end it."""

    def __init__(self) -> None:
        self._armed = False
        self.since = -math.inf   # node time of the last counted True

    def disarm(self) -> None:
        self._armed = False

    def observe(self, success: bool, now: float) -> None:
        if not success:
            self._armed = True
        elif self._armed:
            self.since = now
