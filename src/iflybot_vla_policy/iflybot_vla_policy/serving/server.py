"""Websocket policy server speaking openpi's protocol, hardened for a lab network.

Protocol (what openpi-client 0.1.2 expects): on connect the server sends one binary msgpack frame
with its metadata; then each binary frame from the client is an observation dict and gets one
binary frame back with the policy output plus ``server_timing``. A text frame back is an error
message: openpi's client raises ``RuntimeError`` on it. Unlike openpi's reference server we keep
the connection open after an error, so one bad request does not cost the client its session.

Hardening: binds to localhost unless told otherwise; optional API key checked as openpi-client
sends it (``Authorization: Api-Key <key>``), refused with HTTP 401 before the websocket opens;
a message size limit enforced by the websocket layer (a message over it is never buffered: the
connection is closed with code 1009 'message too big' and its reason names the limit, since the
rest of the message cannot be skipped and the stream resynchronised); ``GET /healthz`` for load
balancers and supervisors; graceful shutdown that lets running inference answer first.
"""
from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.asyncio.server import Request, Response, Server, ServerConnection, serve

from iflybot_vla_policy.serving import codec
from iflybot_vla_policy.serving.batching import (
    InferenceBatcher,
    ServablePolicy,
    ServerClosingError,
    policy_metadata,
)

logger = logging.getLogger(__name__)

PROTOCOL = 'openpi-websocket-msgpack'
HEALTH_PATH = '/healthz'


@dataclass(frozen=True)
class ServerConfig:
    host: str = '127.0.0.1'                 # localhost only unless told otherwise
    port: int = 8000                        # 0: any free port (see PolicyServer.port)
    api_key: str | None = None              # None: no authentication
    max_message_bytes: int = 32 * 2**20     # two 1280x720 RGB images are ~5.5 MB
    max_batch: int = 8                      # 1 disables batching
    max_clients: int = 64                   # more connections get HTTP 503
    shutdown_timeout_s: float = 10.0        # how long running inference may finish on shutdown

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f'port must be in 0..65535, got {self.port}')
        if self.max_message_bytes < 1024:
            raise ValueError(f'max_message_bytes must be >= 1024, got {self.max_message_bytes}')
        if self.max_batch < 1:
            raise ValueError(f'max_batch must be >= 1, got {self.max_batch}')
        if self.max_clients < 1:
            raise ValueError(f'max_clients must be >= 1, got {self.max_clients}')
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError('api_key must be non-empty when given')


class PolicyServer:
    """Serves one policy to many websocket clients; start() binds, shutdown() drains and closes."""

    def __init__(self, policy: ServablePolicy, config: ServerConfig = ServerConfig(),
                 metadata: dict | None = None) -> None:
        self.config = config
        self._batcher = InferenceBatcher(policy, config.max_batch)
        self._metadata = {
            **(policy_metadata(policy) if metadata is None else metadata),
            'server': {'name': 'iflybot-vla', 'protocol': PROTOCOL,
                       'max_message_bytes': config.max_message_bytes,
                       'max_batch': self._batcher.max_batch},
        }
        self._metadata_frame = codec.pack(self._metadata)   # TypeError now, not per client
        self._expected_auth = (f'Api-Key {config.api_key}'.encode()
                               if config.api_key is not None else None)
        self._server: Server | None = None
        self._port: int | None = None
        self._closing = False
        self.clients = 0
        self.errors = 0

    @property
    def metadata(self) -> dict:
        return self._metadata

    @property
    def port(self) -> int:
        """The bound port (the OS's choice when configured with port 0)."""
        if self._port is None:
            raise RuntimeError('server not started')
        return self._port

    @property
    def uri(self) -> str:
        return f'ws://{self.config.host}:{self.port}'

    async def start(self) -> None:
        self._batcher.start()
        self._server = await serve(
            self._handle, self.config.host, self.config.port,
            process_request=self._process_request,
            max_size=self.config.max_message_bytes,
            compression=None,          # images do not deflate; openpi-client disables it too
            max_queue=4,               # frames buffered per client; bounds memory with max_size
        )
        self._port = self._server.sockets[0].getsockname()[1]
        logger.info('serving %s on %s (api key %s)', PROTOCOL, self.uri,
                    'required' if self._expected_auth else 'not required')

    async def shutdown(self) -> None:
        """Stop accepting, let running inference reply, then close connections (code 1001)."""
        if self._server is None or self._closing:
            return
        self._closing = True
        self._server.close(close_connections=False)
        await self._batcher.close(self.config.shutdown_timeout_s)
        connections = list(self._server.connections)
        if connections:
            await asyncio.gather(*(c.close(1001, 'server shutting down') for c in connections),
                                 return_exceptions=True)
        await self._server.wait_closed()
        logger.info('server stopped after %d requests in %d batches',
                    self._batcher.stats.requests, self._batcher.stats.batches)

    async def serve_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.shutdown()

    def health(self) -> dict[str, Any]:
        stats = self._batcher.stats
        return {'status': 'shutting_down' if self._closing else 'ok', 'clients': self.clients,
                'busy': self._batcher.busy, 'queued': self._batcher.queued,
                'requests': stats.requests, 'batches': stats.batches,
                'largest_batch': stats.largest_batch, 'errors': self.errors}

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split('?', 1)[0] == HEALTH_PATH:
            health = self.health()
            status = http.HTTPStatus.OK if health['status'] == 'ok' else \
                http.HTTPStatus.SERVICE_UNAVAILABLE
            response = connection.respond(status, json.dumps(health) + '\n')
            del response.headers['Content-Type']
            response.headers['Content-Type'] = 'application/json'
            return response
        if self._expected_auth is not None:
            given = request.headers.get_all('Authorization')
            if len(given) != 1 or not hmac.compare_digest(given[0].encode(),
                                                          self._expected_auth):
                logger.warning('refused %s: missing or wrong API key', connection.remote_address)
                return connection.respond(
                    http.HTTPStatus.UNAUTHORIZED,
                    'missing or invalid API key: send the header "Authorization: Api-Key <key>"\n')
        if self.clients >= self.config.max_clients:
            logger.warning('refused %s: %d clients connected', connection.remote_address,
                           self.clients)
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f'too many clients (limit {self.config.max_clients})\n')
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        self.clients += 1
        peer = connection.remote_address
        logger.info('client %s connected', peer)
        try:
            await connection.send(self._metadata_frame)
            prev_total_ms: float | None = None
            async for message in connection:
                start = time.perf_counter()
                reply = await self._answer(message, prev_total_ms)
                if isinstance(reply, str):
                    self.errors += 1
                    logger.info('error reply to %s: %s', peer, reply)
                await connection.send(reply)
                prev_total_ms = (time.perf_counter() - start) * 1e3
        except websockets.ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == 1009:   # over max_message_bytes
                self.errors += 1
                logger.warning('closed %s: %s', peer, exc.sent.reason)
        finally:
            self.clients -= 1
            logger.info('client %s disconnected', peer)

    async def _answer(self, message: str | bytes, prev_total_ms: float | None) -> str | bytes:
        """The reply frame: bytes for a result, str (a text frame) for an error."""
        if isinstance(message, str):
            return 'bad request: expected a binary msgpack frame, got a text frame'
        try:
            obs = codec.unpack(message)
        except codec.DecodeError as exc:
            return f'malformed request: {exc}'
        if not isinstance(obs, dict):
            return f'bad request: expected a map (observation dict), got {type(obs).__name__}'
        try:
            result, timing = await self._batcher.infer(obs)
        except ServerClosingError as exc:
            return str(exc)
        except Exception as exc:   # the policy refused this observation; others are unaffected
            logger.debug('inference failed', exc_info=True)
            return f'inference failed: {type(exc).__name__}: {exc}'
        if not isinstance(result, dict):
            return f'inference failed: policy returned {type(result).__name__}, not a dict'
        server_timing = {'infer_ms': timing.infer_ms, 'queue_ms': timing.queue_ms,
                         'batch_size': timing.batch_size}
        if prev_total_ms is not None:
            server_timing['prev_total_ms'] = prev_total_ms
        try:
            return codec.pack({**result, 'server_timing': server_timing})
        except (TypeError, ValueError, OverflowError) as exc:
            logger.error('cannot encode policy output: %s', exc)
            return f'inference failed: cannot encode the policy output: {exc}'


def run_server(policy: ServablePolicy, config: ServerConfig,
               on_ready: Callable[[PolicyServer], None] | None = None) -> int:
    """Serve until SIGINT or SIGTERM, then shut down gracefully; returns an exit code."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = PolicyServer(policy, config)
        await server.start()
        try:
            if on_ready is not None:
                on_ready(server)
            await stop.wait()
            logger.info('signal received, shutting down')
        finally:
            await server.shutdown()

    asyncio.run(main())
    return 0
