"""Policy server: openpi wire compatibility, robustness to bad clients, auth, health, batching."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
import websockets
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.sync.client import connect

from iflybot_vla_policy.policy import Policy
from iflybot_vla_policy.serving import codec
from iflybot_vla_policy.serving.background import ServerThread
from iflybot_vla_policy.serving.process import ServerProcess
from iflybot_vla_policy.serving.server import ServerConfig

# openpi-client 0.1.2 calls websockets' connect() the pre-17 way; that is its business, not ours.
pytestmark = pytest.mark.filterwarnings('ignore:connect\\(\\) must be used:DeprecationWarning')

KEY = 'lab-secret-7'
LIMIT = 2**20   # 1 MiB: two 96x96 cameras encode to ~55 kB


def observation(seed: int = 0, size: int = 96) -> dict:
    rng = np.random.default_rng(seed)
    return {
        'images': {name: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                   for name in ('scene_camera', 'wrist_camera')},
        'state': np.concatenate([rng.uniform(-0.5, 0.5, 7), [0.04]]).astype(np.float32),
        'instruction': 'pick up the red cube',
    }


class GatedPolicy:
    """The real policy with a fixed noise seed (so a test can recompute the expected answers),
    whose every forward pass waits until the test opens the gate: a test can hold the server
    busy and know exactly which requests queue up meanwhile."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self.cfg = policy.cfg
        self.gate = threading.Event()
        self.entered = threading.Event()

    def infer(self, obs: dict) -> dict:
        self.entered.set()
        assert self.gate.wait(120), 'test never opened the gate'
        return self._policy.infer(obs, seed=0)

    def infer_batch(self, observations: list[dict]) -> dict:
        self.entered.set()
        assert self.gate.wait(120), 'test never opened the gate'
        return self._policy.infer_batch(observations, seed=0)


@pytest.fixture(scope='module')
def policy() -> Policy:
    return Policy.from_config('tiny', seed=0)


@pytest.fixture(scope='module')
def expected_shape(policy: Policy) -> tuple[int, ...]:
    return (policy.cfg.action.horizon, policy.cfg.robot_action_dim)


@pytest.fixture(scope='module')
def server(policy: Policy):
    with ServerThread(policy, ServerConfig(port=0, api_key=KEY, max_message_bytes=LIMIT)) as s:
        yield s


def _accepts_connections(uri: str) -> bool:
    try:
        health(uri)
        return True
    except OSError:
        return False


def health(uri: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(uri.replace('ws://', 'http://') + '/healthz', timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow   # starts `iflybot serve` processes (torch import, model build)
def test_openpi_client_gets_action_chunk_from_iflybot_serve_process(policy):
    server = ServerProcess(preset='tiny', api_key=KEY)
    try:
        uri = server.start()
        client = WebsocketClientPolicy(uri, api_key=KEY)
        metadata = client.get_server_metadata()
        assert metadata['server']['protocol'] == 'openpi-websocket-msgpack'
        result = client.infer(observation())
        assert result['actions'].dtype == np.float32
        assert result['actions'].shape == (metadata['action_horizon'], metadata['action_dim'])
        assert result['server_timing']['infer_ms'] > 0
        # The server's first answer is what the same preset computes here with the same noise
        # (its generator is seeded 0 and this is its first draw).
        local = policy.infer(observation(), seed=0)
        np.testing.assert_allclose(result['actions'], local['actions'], atol=1e-4)
        # SIGTERM is a clean shutdown: exit code 0, the client sees 1001 'going away'.
        assert server.stop() == 0, server.log_tail()
        with pytest.raises(websockets.ConnectionClosedOK) as closed:
            client.infer(observation())
        assert closed.value.rcvd.code == 1001
    finally:
        server.close()


def test_codec_writes_the_same_bytes_as_openpi_msgpack_numpy():
    obs = {**observation(), 'scalar': np.float32(0.5), 'nested': [np.arange(3, dtype=np.int16)]}
    assert codec.pack(obs) == msgpack_numpy.packb(obs)
    decoded = codec.unpack(msgpack_numpy.packb(obs))
    np.testing.assert_array_equal(decoded['images']['scene_camera'],
                                  obs['images']['scene_camera'])
    assert decoded['scalar'] == 0.5 and decoded['scalar'].dtype == np.float32
    assert decoded['nested'][0].dtype == np.int16
    assert decoded['state'].flags.writeable   # torch.from_numpy wants writable arrays


@pytest.mark.parametrize('message, complaint', [
    (b'\xc1\x00', 'not a msgpack message'),
    (msgpack.packb({b'__ndarray__': True, b'data': b'abc', b'dtype': '<f4', b'shape': [1]}),
     'needs 4 bytes, got 3'),
    (msgpack.packb({b'__ndarray__': True, b'data': b'12345678', b'dtype': '|O',
                    b'shape': [1]}), 'refused array dtype'),
    (msgpack.packb({b'__ndarray__': True, b'data': b'', b'dtype': '<f4', b'shape': [-1]}),
     'non-negative'),
    (msgpack.packb({1: 2}), 'not allowed for map key'),
])
def test_codec_refuses_malformed_messages_naming_the_problem(message, complaint):
    with pytest.raises(codec.DecodeError, match=complaint):
        codec.unpack(message)


def test_malformed_requests_get_an_error_text_frame_and_the_connection_keeps_serving(
        server, expected_shape):
    with connect(server.uri, additional_headers={'Authorization': f'Api-Key {KEY}'}) as ws:
        ws.recv(timeout=10)   # metadata
        for bad, complaint in [(b'\xc1garbage', 'malformed request'),
                               ('{"state": [0]}', 'expected a binary msgpack frame'),
                               (msgpack.packb([1, 2, 3]), 'expected a map')]:
            ws.send(bad)
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str) and complaint in reply
        ws.send(codec.pack(observation()))
        reply = ws.recv(timeout=30)
        assert isinstance(reply, bytes)
        assert codec.unpack(reply)['actions'].shape == expected_shape


def test_observation_the_policy_rejects_gets_an_error_reply_and_the_client_carries_on(server):
    client = WebsocketClientPolicy(server.uri, api_key=KEY)
    bad = observation()
    del bad['state']
    with pytest.raises(RuntimeError, match='Error in inference server'):
        client.infer(bad)
    assert client.infer(observation())['actions'].dtype == np.float32


def test_oversized_request_is_refused_and_other_clients_keep_being_served(server):
    other = WebsocketClientPolicy(server.uri, api_key=KEY)
    errors_before = health(server.uri)[1]['errors']
    big = observation(size=1024)   # two 1024x1024 cameras: 6 MB, over the 1 MiB limit
    with connect(server.uri, additional_headers={'Authorization': f'Api-Key {KEY}'},
                 max_size=None) as ws:
        ws.recv(timeout=10)
        ws.send(codec.pack(big))
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1009   # 'message too big', the reason names the limit
    assert str(LIMIT) in closed.value.rcvd.reason
    assert other.infer(observation())['actions'].dtype == np.float32
    assert health(server.uri)[1]['errors'] == errors_before + 1


def test_clients_without_the_right_api_key_get_http_401_and_keyed_clients_are_served(server):
    for key in (None, 'wrong-key'):
        with pytest.raises(websockets.InvalidStatus) as refused:
            WebsocketClientPolicy(server.uri, api_key=key)
        assert refused.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus):   # a prefix of the key is not the key
        WebsocketClientPolicy(server.uri, api_key=KEY[:-1])
    assert WebsocketClientPolicy(server.uri, api_key=KEY).infer(observation())['actions'].size


def test_health_endpoint_answers_plain_http_get_without_api_key(server):
    status, body = health(server.uri)
    assert status == 200
    assert body['status'] == 'ok' and body['requests'] >= 0


def test_clients_over_the_connection_limit_get_http_503(policy):
    with ServerThread(policy, ServerConfig(port=0, max_clients=1)) as s:
        first = WebsocketClientPolicy(s.uri)
        with pytest.raises(websockets.InvalidStatus) as refused:
            WebsocketClientPolicy(s.uri)
        assert refused.value.response.status_code == 503
        assert first.infer(observation())['actions'].size


def test_requests_that_queue_during_a_forward_pass_run_as_one_batch(policy, wait):
    gated = GatedPolicy(policy)
    with ServerThread(gated, ServerConfig(port=0, max_batch=8)) as s:
        clients = [WebsocketClientPolicy(s.uri) for _ in range(4)]
        results: dict[int, dict] = {}
        threads = [threading.Thread(target=lambda i=i: results.update(
            {i: clients[i].infer(observation(seed=i))})) for i in range(4)]
        threads[0].start()
        assert gated.entered.wait(60)               # request 0 is in the forward pass
        for i in (1, 2, 3):                         # 1, 2, 3 queue up behind it, in this order
            threads[i].start()
            assert wait(lambda i=i: health(s.uri)[1]['queued'] == i, timeout=60)
        gated.gate.set()
        for t in threads:
            t.join(120)
    assert results[0]['server_timing']['batch_size'] == 1
    assert [results[i]['server_timing']['batch_size'] for i in (1, 2, 3)] == [3, 3, 3]
    # Each client got the row of the batch computed from its own observation.
    np.testing.assert_allclose(results[0]['actions'],
                               policy.infer(observation(seed=0), seed=0)['actions'], atol=1e-5)
    batch = policy.infer_batch([observation(seed=i) for i in (1, 2, 3)], seed=0)['actions']
    for row, i in enumerate((1, 2, 3)):
        assert results[i]['actions'].shape == batch[row].shape
        np.testing.assert_allclose(results[i]['actions'], batch[row], atol=1e-5)
    assert not np.allclose(results[1]['actions'], results[2]['actions'])


def test_shutdown_lets_the_running_request_answer_then_closes_clients_with_1001(policy, wait):
    gated = GatedPolicy(policy)
    # The grace period is not under test: long enough for a starved machine to answer.
    s = ServerThread(gated, ServerConfig(port=0, shutdown_timeout_s=120.0)).start()
    client = WebsocketClientPolicy(s.uri)
    result: dict = {}
    asking = threading.Thread(target=lambda: result.update(client.infer(observation())))
    asking.start()
    assert gated.entered.wait(30)
    stopping = threading.Thread(target=lambda: s.stop(timeout=150.0))
    stopping.start()
    # Shutting down: new connections are refused while the running request is finishing.
    assert wait(lambda: not _accepts_connections(s.uri), timeout=30)
    assert asking.is_alive()
    gated.gate.set()
    asking.join(150)
    stopping.join(150)
    assert result['actions'].dtype == np.float32
    with pytest.raises(websockets.ConnectionClosedOK) as closed:
        client.infer(observation())
    assert closed.value.rcvd.code == 1001
