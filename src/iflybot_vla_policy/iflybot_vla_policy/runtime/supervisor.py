"""The run/hold state machine of the policy runtime: every state change happens here.

The robot moves only in RUNNING. A hold has a cause, and the cause decides what ends it: fresh
inputs end an INPUT hold, an observation that decodes ends an OBSERVATION hold, an answer from
the policy server ends a SERVER hold, and only a new instruction (or goal) ends a USER hold or
an ERROR. `generation` counts the changes that make
an inference in flight worthless (its result is dropped when the generation moved on).
"""
from __future__ import annotations

from collections.abc import Callable
from enum import Enum, IntEnum


class RunState(IntEnum):
    """The values of iflybot_vla_msgs/PolicyStatus.STATE_*."""

    IDLE = 0      # configured or inactive: not commanding the robot
    RUNNING = 1   # active and executing the model's chunks
    HOLD = 2      # active, holding position
    ERROR = 3     # active, holding after a tracking or inference failure


class HoldCause(Enum):
    NONE = 'none'       # not holding
    USER = 'user'       # no instruction, goal ended or canceled, e-stop, deactivated, shutdown
    INPUT = 'input'     # stale input: ends when every input is fresh again
    OBSERVATION = 'observation'   # a frame or state the model cannot take: ends when an
    #                               observation decodes (requests go on)
    SERVER = 'server'   # policy server unreachable: ends when it answers (requests go on)
    ERROR = 'error'     # tracking error or model failure: ends with a new instruction


Log = Callable[[str, str], None]   # (level: 'info' | 'warning' | 'error', text)


class Supervisor:
    """State, hold cause, the last error text, whether the node is active, and the generation.

    The methods named for events return True when the caller must brake (publish a stop)."""

    def __init__(self, log: Log) -> None:
        self._log = log
        self.active = False
        self.state = RunState.IDLE
        self.cause = HoldCause.NONE
        self.last_error = ''
        self.generation = 0

    @property
    def reported_state(self) -> RunState:
        return self.state if self.active else RunState.IDLE

    @property
    def wants_chunks(self) -> bool:
        """Running, or holding for the server or for an observation the model can take:
        requests go on (they reconnect, paced by the server's backoff; they try new frames)."""
        return self.state == RunState.RUNNING or self.cause in (HoldCause.SERVER,
                                                                HoldCause.OBSERVATION)

    def _set(self, state: RunState, reason: str, cause: HoldCause) -> None:
        if state != self.state or reason != self.last_error:
            text = state.name + (f': {reason}' if reason else '')
            self._log('error' if state == RunState.ERROR else 'info', text)
        self.state, self.last_error, self.cause = state, reason, cause

    def _run(self) -> None:
        self._set(RunState.RUNNING, '', HoldCause.NONE)

    # ------------------------------------------------------------------------ events
    def hold(self, cause: HoldCause, reason: str) -> bool:
        """Stop: in-flight chunks are dropped; ERROR for the error cause, HOLD otherwise."""
        assert cause != HoldCause.NONE
        self.generation += 1
        self._set(RunState.ERROR if cause == HoldCause.ERROR else RunState.HOLD, reason, cause)
        return True

    def activate(self, instruction: str) -> None:
        self.active = True
        self.generation += 1
        if instruction:
            self._run()
        else:
            self._set(RunState.HOLD, 'waiting for an instruction', HoldCause.USER)

    def deactivate(self, reason: str) -> bool:
        self.hold(HoldCause.USER, reason)
        self.active = False
        self.state = RunState.IDLE
        return True

    def instruct(self, instruction: str) -> bool:
        """A new instruction (topic or goal): run it, or hold for the user when it is empty.
        Returns whether the run (re)starts from a stop (False while already running)."""
        self.generation += 1
        if not self.active:
            return False
        if not instruction:
            self.hold(HoldCause.USER, 'waiting for an instruction')
            return False
        restarted = self.state != RunState.RUNNING
        self._run()
        return restarted

    def inputs_stale(self, reason: str) -> bool:
        """Only a run stops for stale inputs: a user, server or observation hold stays what it
        is (fresh inputs would otherwise resume a server hold with the server still down, or an
        observation hold while the frames are still bad), an ERROR too."""
        if self.state == RunState.RUNNING:
            return self.hold(HoldCause.INPUT, reason)
        return False

    def inputs_fresh(self) -> None:
        if self.state == RunState.HOLD and self.cause == HoldCause.INPUT:
            self._run()

    def bad_observation(self, reason: str) -> bool:
        """An observation could not be decoded: hold (and brake) once, naming the latest."""
        if self.cause == HoldCause.OBSERVATION:
            self.last_error = reason
            return False
        return self.hold(HoldCause.OBSERVATION, reason)

    def server_unreachable(self, reason: str) -> bool:
        if self.cause == HoldCause.SERVER:
            return False
        return self.hold(HoldCause.SERVER, reason)

    def observation_decoded(self) -> None:
        if self.active and self.cause == HoldCause.OBSERVATION:
            self._run()

    def server_answered(self) -> None:
        if self.active and self.cause == HoldCause.SERVER:
            self._run()

    def note(self, reason: str) -> None:
        """A problem that braked without leaving the state (a rejected chunk)."""
        self.last_error = reason
