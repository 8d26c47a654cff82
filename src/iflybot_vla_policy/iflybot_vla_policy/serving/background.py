"""A PolicyServer on a background thread of this process (tests, notebooks, one-box demos).

`iflybot serve` is the deployment path (its own process, signals, logs); this is the cheap way to
get a real server on a real port next to an already loaded policy.
"""
from __future__ import annotations

import asyncio
import threading

from iflybot_vla_policy.serving.batching import ServablePolicy
from iflybot_vla_policy.serving.server import PolicyServer, ServerConfig


class ServerThread:
    """Context manager: starts the server on its own event loop thread, shuts it down on exit."""

    def __init__(self, policy: ServablePolicy,
                 config: ServerConfig = ServerConfig(port=0)) -> None:
        self.server = PolicyServer(policy, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name='policy-server',
                                        daemon=True)

    @property
    def uri(self) -> str:
        return self.server.uri

    def start(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=30)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful shutdown (as on SIGTERM), then stop the loop thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
