"""Policy inference off the event loop, with requests that wait together run as one batch.

The event loop only moves bytes; one worker thread owns the policy (models are rarely
thread-safe, and a single GPU runs one forward at a time anyway). Requests that arrive while a
forward pass is running queue up and, if the policy has ``infer_batch``, go through the next pass
together: with N clients that costs one batched forward instead of N sequential ones. A lone
client never waits for company: there is no batching window, so batching adds no latency.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)


class ServablePolicy(Protocol):
    """What the server needs from a policy; ``infer_batch`` and ``metadata`` are optional.

    ``infer_batch(observations)`` returns either one dict per observation or, like
    ``Policy.infer_batch``, one dict whose arrays are stacked along a leading batch axis (other
    values, such as 'dt' or a timing dict, are shared by all observations).
    """

    def infer(self, obs: dict) -> dict: ...


SHUTTING_DOWN = 'server is shutting down'   # start of the error reply; clients may retry


class ServerClosingError(RuntimeError):
    """The server is shutting down and takes no new requests."""


@dataclass(frozen=True)
class InferenceTiming:
    queue_ms: float     # from arrival to the start of the forward pass that served it
    infer_ms: float     # duration of that forward pass (the whole batch)
    batch_size: int


@dataclass
class _Request:
    obs: dict
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0


class InferenceBatcher:
    """Serialises inference on one worker thread and batches requests that queue up meanwhile."""

    def __init__(self, policy: ServablePolicy, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f'max_batch must be >= 1, got {max_batch}')
        batch_fn = getattr(policy, 'infer_batch', None)
        self._policy = policy
        self._batch_fn: Callable[[list[dict]], Sequence[Mapping]] | None = (
            batch_fn if callable(batch_fn) and max_batch > 1 else None)
        self.max_batch = max_batch if self._batch_fn is not None else 1
        self.stats = BatcherStats()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix='inference')
        self._queue: asyncio.Queue[_Request] | None = None
        self._worker: asyncio.Task | None = None
        self._busy = False
        self._closing = False

    @property
    def queued(self) -> int:
        """Requests waiting for the worker (not counting the batch being run)."""
        return 0 if self._queue is None else self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self._busy

    def start(self) -> None:
        """Start the worker task; call from inside the running event loop."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def infer(self, obs: dict) -> tuple[dict, InferenceTiming]:
        """Queue one observation and wait for its result (exceptions of the policy propagate)."""
        if self._closing or self._queue is None:
            raise ServerClosingError(SHUTTING_DOWN)
        request = _Request(obs, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(request)
        return await request.future

    async def close(self, timeout: float = 10.0) -> None:
        """Refuse new requests, let queued and running ones finish, then stop the worker."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while self._queue is not None and (self._busy or not self._queue.empty()):
            if time.monotonic() > deadline:
                logger.warning('inference still running after %.1f s; stopping anyway', timeout)
                break
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            _fail([self._queue.get_nowait()], ServerClosingError(SHUTTING_DOWN))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [r for r in batch if not r.future.done()]   # clients that left meanwhile
            if not batch:
                continue
            self._busy = True
            start = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(
                    self._executor, self._run, [r.obs for r in batch])
            except asyncio.CancelledError:
                _fail(batch, ServerClosingError(f'{SHUTTING_DOWN} (dropped during inference)'))
                raise
            finally:
                self._busy = False
            infer_ms = (time.perf_counter() - start) * 1e3
            self.stats.requests += len(batch)
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for request, outcome in zip(batch, outcomes, strict=True):
                if request.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    request.future.set_exception(outcome)
                else:
                    timing = InferenceTiming((start - request.arrived) * 1e3, infer_ms, len(batch))
                    request.future.set_result((outcome, timing))

    def _run(self, observations: list[dict]) -> list[dict | BaseException]:
        """Worker thread: one batched call, or per-request calls (which isolate a bad request)."""
        if self._batch_fn is not None and len(observations) > 1:
            try:
                results = split_batch(self._batch_fn(observations), len(observations))
                if len(results) == len(observations):
                    return results
                logger.error('infer_batch returned %d results for %d observations',
                             len(results), len(observations))
            except Exception:
                # One malformed observation fails the whole batch; rerun one by one so that only
                # its sender gets the error.
                logger.debug('batched inference failed, retrying one by one', exc_info=True)
        outcomes: list[dict | BaseException] = []
        for obs in observations:
            try:
                outcomes.append(self._policy.infer(obs))
            except Exception as exc:   # reported to that client; the server keeps serving
                outcomes.append(exc)
        return outcomes


def split_batch(output: Mapping | Sequence[Mapping], size: int) -> list[dict]:
    """infer_batch output -> one dict per observation (see ServablePolicy)."""
    if not isinstance(output, Mapping):
        return [dict(item) for item in output]
    per_item: list[dict] = [{} for _ in range(size)]
    for key, value in output.items():
        stacked = isinstance(value, np.ndarray) and value.ndim >= 1 and len(value) == size
        for i, item in enumerate(per_item):
            item[key] = value[i] if stacked else value
    return per_item


def _fail(requests: list[_Request], exc: BaseException) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_exception(exc)


def policy_metadata(policy: Any) -> dict:
    """What a client needs to know before its first request.

    The policy's own ``metadata`` (attribute, property or method) if it has one; else, for our
    ``Policy``, the action contract read from its config (``cfg``); else {}.
    """
    metadata = getattr(policy, 'metadata', None)
    if callable(metadata):
        metadata = metadata()
    if metadata is None:
        cfg = getattr(policy, 'cfg', None)
        if cfg is None or not hasattr(cfg, 'action'):
            return {}
        return {'policy': 'iflybot-vla', 'config': cfg.name,
                'action_space': cfg.action.space, 'action_dim': int(cfg.robot_action_dim),
                'action_horizon': int(cfg.action.horizon), 'dt': float(cfg.action.dt),
                'cameras': list(cfg.cameras), 'image_size': int(cfg.image_size)}
    if not isinstance(metadata, Mapping):
        raise TypeError(f'policy.metadata must be a mapping, got {type(metadata).__name__}')
    return dict(metadata)
