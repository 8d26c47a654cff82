"""Lifecycle transitions of a graph's nodes, for `iflybot up`: lifecycle_msgs service calls from
a private rclpy context spun on a background thread, robust to DDS dropping a request or reply on
a loaded machine."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any


class LifecycleClient:
    """lifecycle_msgs service calls from a private rclpy context spun on a background thread."""

    _TRANSITIONS = {'configure': 1, 'cleanup': 2, 'activate': 3, 'deactivate': 4}

    def __init__(self) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions

        self._rclpy = rclpy
        self._context = rclpy.Context()
        rclpy.init(args=[], context=self._context, signal_handler_options=SignalHandlerOptions.NO)
        self._node = rclpy.create_node(f'iflybot_up_{os.getpid()}', context=self._context)
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(self._node)
        self._thread = threading.Thread(target=self._spin, daemon=True, name='lifecycle-spin')
        self._thread.start()
        self._lock = threading.Lock()

    def _spin(self) -> None:
        try:
            while self._context.ok():
                self._executor.spin_once(timeout_sec=0.05)
        except Exception:  # noqa: BLE001 - shutting down the context ends the spin
            pass

    def _client(self, srv_type: Any, name: str) -> Any:
        with self._lock:
            return self._node.create_client(srv_type, name)

    def _call(self, client: Any, request: Any, timeout: float,
              alive: Callable[[], bool]) -> Any:
        deadline = time.monotonic() + timeout
        while not client.wait_for_service(timeout_sec=0.1):
            if not alive():
                return None
            if time.monotonic() > deadline:
                raise TimeoutError(f'service {client.srv_name} did not appear in {timeout:.0f} s')
        future = client.call_async(request)
        while not future.done():
            if not alive():
                return None
            if time.monotonic() > deadline:
                raise TimeoutError(f'no reply from {client.srv_name} in {timeout:.0f} s')
            time.sleep(0.01)
        return future.result()

    # transition -> (state before, state during, state after)
    _STATES = {'configure': ('unconfigured', 'configuring', 'inactive'),
               'cleanup': ('inactive', 'cleaningup', 'unconfigured'),
               'activate': ('inactive', 'activating', 'active'),
               'deactivate': ('active', 'deactivating', 'inactive')}

    def transition(self, fqn: str, name: str, timeout: float,
                   alive: Callable[[], bool], retry_s: float = 10.0) -> str | None:
        """Trigger a transition; returns the state label afterwards (None if stopped).

        On a loaded machine DDS can drop a service request or reply (a server gives up on a
        client whose response reader it has not matched yet), so a call that goes unanswered
        for `retry_s` is followed by asking the node's state: done, still in progress (keep
        waiting), or untouched (ask again), all within `timeout`.
        """
        from lifecycle_msgs.srv import ChangeState, GetState

        change = self._client(ChangeState, f'{fqn}/change_state')
        get = self._client(GetState, f'{fqn}/get_state')
        request = ChangeState.Request()
        request.transition.id = self._TRANSITIONS[name]
        before, during, after = self._STATES[name]
        deadline = time.monotonic() + timeout
        remaining = lambda: deadline - time.monotonic()  # noqa: E731
        while not change.wait_for_service(timeout_sec=0.1):   # the process is starting up
            if not alive():
                return None
            if remaining() <= 0:
                raise TimeoutError(f'service {change.srv_name} did not appear in {timeout:.0f} s')
        while True:
            if remaining() <= 0:
                raise TimeoutError(f'no reply from {change.srv_name} in {timeout:.0f} s')
            try:
                reply = self._call(change, request, min(retry_s, remaining()), alive)
            except TimeoutError:
                label = self._wait_while(get, during, remaining, retry_s, alive)
                if label is None:
                    return None
                if label == after:
                    return label          # it happened; only the reply was lost
                if label and label != before:
                    raise RuntimeError(f'{name} did not complete (now {label!r}); see the '
                                       'node log above') from None
                continue                  # untouched or unknown: ask again
            if reply is None:
                return None
            state = self._wait_while(get, '', remaining, retry_s, alive)
            if state is None:
                return None
            if not reply.success and state != after:   # (a repeated request fails once the
                raise RuntimeError(f'{name} failed (now {state!r}); see the node log above')
            return state or after                      # first one has done the transition)

    def _wait_while(self, get: Any, during: str, remaining: Callable[[], float],
                    retry_s: float, alive: Callable[[], bool]) -> str | None:
        """The node's state label once it is not `during` ('' if it never answers in time)."""
        from lifecycle_msgs.srv import GetState

        while remaining() > 0:
            try:
                reply = self._call(get, GetState.Request(), min(retry_s, remaining()), alive)
            except TimeoutError:
                continue
            if reply is None:
                return None
            label = reply.current_state.label
            if label != during:
                return label
            time.sleep(0.2)
        return ''

    def close(self) -> None:
        try:
            self._executor.shutdown(timeout_sec=1.0)
            self._node.destroy_node()
            if self._context.ok():
                self._rclpy.shutdown(context=self._context)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        self._thread.join(timeout=1.0)
