"""The inference worker: one background thread that runs the newest request, so that neither
the control tick nor the executor ever waits for the model."""
from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from typing import Any


class InferenceWorker:
    """Runs `handle(request)` on its thread, one request at a time; submit() never blocks and
    refuses while busy (the next complete frame set makes the next request)."""

    def __init__(self, handle: Callable[[Any], None]) -> None:
        self._handle = handle
        self._cv = threading.Condition()
        self._request: Any = None
        self._busy = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name='inference', daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, request: Any) -> bool:
        with self._cv:
            if self._busy:
                return False
            self._busy = True
            self._request = request
            self._cv.notify()
            return True

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._request is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                request, self._request = self._request, None
            try:
                self._handle(request)
            except Exception:  # noqa: BLE001 - the worker must outlive any single request
                traceback.print_exc()
            finally:
                with self._cv:
                    self._busy = False
