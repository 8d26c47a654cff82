"""A policy that runs on another machine: a client of ``iflybot serve`` or an openpi server.

``wire_format`` says which observation keys and action units the server speaks: 'iflybot' (our
own dict, what ``iflybot serve`` expects) or 'droid' (openpi's DROID convention, e.g. a
pi0.5-DROID server; the mapping and its units are in serving/droid.py). Any other openpi server
expects its own robot's keys and needs its own mapping.

A Franka's real-time PC rarely has a GPU, so the model runs on a server and the policy node calls
it through this class, which has the same ``infer(obs) -> dict`` as the local policy. Failure
semantics are chosen for a robot: while the server is unreachable ``infer`` raises
``ServerUnavailableError`` (a ``ConnectionError``) at once instead of blocking, so the node holds
position; reconnection is attempted on later calls with exponential backoff, and the first call
that gets through resumes normal operation. Errors that retrying cannot fix (the server refused
this observation, the request is too large) raise ``RemoteInferenceError`` / ``ValueError``.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import websockets
from websockets.sync.client import ClientConnection, connect

from iflybot_vla_policy.serving import WIRE_FORMATS, codec
from iflybot_vla_policy.serving.batching import SHUTTING_DOWN
from iflybot_vla_policy.serving.droid import DroidFormat


class ServerUnavailableError(ConnectionError):
    """The server cannot be reached (or stopped answering); retry_in_s says when to try again."""

    def __init__(self, message: str, retry_in_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s


class RemoteInferenceError(RuntimeError):
    """The server answered with an error message (a text frame) for this observation."""


class RemotePolicy:
    """Synchronous, thread-safe client with reconnect-and-backoff; one request in flight."""

    def __init__(self, uri: str, api_key: str | None = None, timeout: float = 10.0,
                 connect_timeout: float = 2.0, backoff_initial_s: float = 0.1,
                 backoff_max_s: float = 5.0, wire_format: str = 'iflybot') -> None:
        if not uri.startswith(('ws://', 'wss://')):
            raise ValueError(f"uri must start with 'ws://' or 'wss://', got {uri!r}")
        if wire_format not in WIRE_FORMATS:
            raise ValueError(f'wire_format must be one of {WIRE_FORMATS}, got {wire_format!r}')
        self.wire_format = wire_format
        self._droid = DroidFormat() if wire_format == 'droid' else None
        for name, value in (('timeout', timeout), ('connect_timeout', connect_timeout),
                            ('backoff_initial_s', backoff_initial_s),
                            ('backoff_max_s', backoff_max_s)):
            if value <= 0:
                raise ValueError(f'{name} must be > 0, got {value}')
        self.uri = uri
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._headers = {'Authorization': f'Api-Key {api_key}'} if api_key else None
        self._lock = threading.Lock()
        self._conn: ClientConnection | None = None
        self._metadata: dict[str, Any] | None = None
        self._failures = 0                  # consecutive failed connection attempts
        self._next_attempt = 0.0            # time.monotonic() before which we do not retry
        self._last_error = ''
        self._closed = False
        self.last_round_trip_s: float | None = None
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def metadata(self) -> dict[str, Any]:
        """The server's metadata frame (connects if needed; ServerUnavailableError if it can't)."""
        with self._lock:
            self._ensure_connected()
            assert self._metadata is not None
            return self._metadata

    def connect(self) -> dict[str, Any]:
        """Connect now (e.g. at node configure time) and return the server metadata."""
        return self.metadata

    def infer(self, obs: dict) -> dict:
        """One observation -> the server's output dict, plus ``client_timing.round_trip_ms``."""
        payload = codec.pack(obs if self._droid is None else self._droid.request(obs))
        with self._lock:
            conn = self._ensure_connected()
            limit = (self._metadata or {}).get('server', {}).get('max_message_bytes')
            if isinstance(limit, int) and len(payload) > limit:
                raise ValueError(f'observation encodes to {len(payload)} bytes, over the '
                                 f"server's limit of {limit} bytes (send smaller images)")
            start = time.perf_counter()
            try:
                conn.send(payload)
                reply = conn.recv(timeout=self.timeout)
            except TimeoutError as exc:
                # A late reply would be taken as the answer to the next request: drop the link.
                self._disconnect(f'no reply within {self.timeout} s', backoff=False)
                raise ServerUnavailableError(
                    f'{self.uri}: no reply within {self.timeout} s') from exc
            except websockets.ConnectionClosed as exc:
                sent_too_big = exc.rcvd is not None and exc.rcvd.code == 1009
                self._disconnect(f'connection closed: {exc}', backoff=not sent_too_big)
                if sent_too_big:
                    raise ValueError(f'{self.uri} refused the request as too large: '
                                     f'{exc.rcvd.reason}') from exc
                raise ServerUnavailableError(f'{self.uri}: connection lost ({exc})',
                                             self._retry_in()) from exc
            except OSError as exc:
                self._disconnect(f'{type(exc).__name__}: {exc}', backoff=True)
                raise ServerUnavailableError(f'{self.uri}: connection lost ({exc})',
                                             self._retry_in()) from exc
            round_trip = time.perf_counter() - start
        if isinstance(reply, str):
            if reply.startswith(SHUTTING_DOWN):   # transient: another server may take over
                with self._lock:
                    self._disconnect(reply, backoff=True)
                raise ServerUnavailableError(f'{self.uri}: {reply}', self._retry_in())
            raise RemoteInferenceError(f'{self.uri}: {reply}')
        try:
            result = codec.unpack(reply)
        except codec.DecodeError as exc:
            raise RemoteInferenceError(f'{self.uri}: undecodable reply: {exc}') from exc
        if not isinstance(result, dict):
            raise RemoteInferenceError(f'{self.uri}: reply is {type(result).__name__}, not a map')
        if self._droid is not None:
            try:
                result = self._droid.reply(result, obs)
            except (KeyError, ValueError) as exc:
                raise RemoteInferenceError(f'{self.uri}: not a DROID reply: {exc!r}') from exc
        self.last_round_trip_s = round_trip
        result['client_timing'] = {'round_trip_ms': round_trip * 1e3}
        return result

    def close(self) -> None:
        """Close the connection; later calls raise ServerUnavailableError. Safe from any thread."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _retry_in(self) -> float:
        return max(0.0, self._next_attempt - time.monotonic())

    def _ensure_connected(self) -> ClientConnection:
        if self._closed:
            raise ServerUnavailableError(f'{self.uri}: client closed')
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._next_attempt:
            raise ServerUnavailableError(
                f'{self.uri} unreachable ({self._last_error}); retrying in '
                f'{self._retry_in():.2f} s', self._retry_in())
        conn = None
        try:
            conn = connect(self.uri, additional_headers=self._headers, compression=None,
                           open_timeout=self.connect_timeout, close_timeout=1.0,
                           max_size=None, legacy=True)
            metadata = codec.unpack(conn.recv(timeout=self.connect_timeout))
            if not isinstance(metadata, dict):
                raise codec.DecodeError(f'metadata is {type(metadata).__name__}, not a map')
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed,
                codec.DecodeError) as exc:
            if conn is not None:
                conn.close()
            self._disconnect(_describe(exc), backoff=True)
            raise ServerUnavailableError(f'{self.uri} unreachable ({self._last_error}); '
                                         f'retrying in {self._retry_in():.2f} s',
                                         self._retry_in()) from exc
        if self._metadata is not None:
            self.reconnects += 1
        self._conn, self._metadata = conn, metadata
        self._failures, self._next_attempt, self._last_error = 0, 0.0, ''
        return conn

    def _disconnect(self, reason: str, backoff: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._last_error = reason
        if backoff:
            self._failures += 1
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (self._failures - 1))
            self._next_attempt = time.monotonic() + delay


def _describe(exc: BaseException) -> str:
    if isinstance(exc, websockets.InvalidStatus):
        body = exc.response.body.decode(errors='replace').strip() if exc.response.body else ''
        return f'HTTP {exc.response.status_code}: {body}'
    return f'{type(exc).__name__}: {exc}' if str(exc) else type(exc).__name__
