"""RemotePolicy: the policy node's client of `iflybot serve` (hold while down, resume after)."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from iflybot_vla_policy.policy import Policy
from iflybot_vla_policy.remote import RemoteInferenceError, RemotePolicy, ServerUnavailableError
from iflybot_vla_policy.serving.background import ServerThread
from iflybot_vla_policy.serving.process import ServerProcess
from iflybot_vla_policy.serving.server import ServerConfig

KEY = 'lab-secret-7'


def observation(seed: int = 0, size: int = 96) -> dict:
    rng = np.random.default_rng(seed)
    return {
        'images': {name: rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                   for name in ('scene_camera', 'wrist_camera')},
        'state': np.concatenate([rng.uniform(-0.5, 0.5, 7), [0.04]]).astype(np.float32),
        'instruction': 'pick up the red cube',
    }


def closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def policy() -> Policy:
    return Policy.from_config('tiny', seed=0)


@pytest.fixture(scope='module')
def server(policy: Policy):
    config = ServerConfig(port=0, api_key=KEY, max_message_bytes=2**20)
    with ServerThread(policy, config) as s:
        yield s


def test_remote_policy_returns_the_policy_output_and_measures_the_round_trip(server, policy):
    with RemotePolicy(server.uri, api_key=KEY) as remote:
        assert remote.connect()['server']['max_message_bytes'] == 2**20
        result = remote.infer(observation())
    local = policy.infer(observation())
    assert result['actions'].shape == local['actions'].shape
    assert result['actions'].dtype == np.float32
    assert result['dt'] == pytest.approx(local['dt'])
    rtt_ms = result['client_timing']['round_trip_ms']
    assert rtt_ms == pytest.approx(remote.last_round_trip_s * 1e3)
    assert rtt_ms >= result['server_timing']['infer_ms'] > 0


@pytest.mark.slow   # starts `iflybot serve` processes (torch import, model build)
def test_remote_policy_raises_connection_error_while_server_is_down_and_resumes_after_restart(
        wait):
    server = ServerProcess(preset='tiny')
    try:
        remote = RemotePolicy(server.start(), timeout=30.0, backoff_initial_s=0.05,
                              backoff_max_s=0.5)
        first = remote.infer(observation())
        server.kill()                                   # crash: no close handshake
        with pytest.raises(ConnectionError):
            remote.infer(observation())
        with pytest.raises(ConnectionError):            # still down: fails fast, no hang
            remote.infer(observation())
        assert not remote.connected
        server.start()                                  # same port as before
        results: list[dict] = []

        def resumed() -> bool:
            try:
                results.append(remote.infer(observation()))
                return True
            except ConnectionError:
                return False

        assert wait(resumed, timeout=30, poll=0.05)
        assert remote.reconnects == 1
        np.testing.assert_array_equal(results[0]['actions'].shape, first['actions'].shape)
    finally:
        server.close()


def test_unreachable_server_is_retried_with_exponential_backoff():
    remote = RemotePolicy(f'ws://127.0.0.1:{closed_port()}', backoff_initial_s=0.2,
                          backoff_max_s=0.4)
    delays = []
    for _ in range(4):
        with pytest.raises(ServerUnavailableError) as down:
            remote.infer(observation())
        delays.append(down.value.retry_in_s)
        # Calls inside the backoff window fail at once without trying to connect.
        with pytest.raises(ServerUnavailableError, match='retrying in') as early:
            remote.infer(observation())
        assert early.value.retry_in_s <= delays[-1]
        time.sleep(down.value.retry_in_s + 0.01)
    assert delays[0] == pytest.approx(0.2, abs=0.05)
    assert delays[1] == pytest.approx(0.4, abs=0.05)
    assert delays[3] == pytest.approx(0.4, abs=0.05)    # capped at backoff_max_s


def test_error_reply_raises_remote_inference_error_and_keeps_the_connection(server):
    remote = RemotePolicy(server.uri, api_key=KEY)
    bad = observation()
    del bad['images']
    with pytest.raises(RemoteInferenceError, match='inference failed'):
        remote.infer(bad)
    assert remote.connected
    assert remote.infer(observation())['actions'].size
    assert remote.reconnects == 0


def test_observation_over_the_server_limit_raises_value_error_before_sending(server):
    remote = RemotePolicy(server.uri, api_key=KEY)
    remote.connect()
    with pytest.raises(ValueError, match='over the server.s limit'):
        remote.infer(observation(size=1024))
    assert remote.connected and remote.infer(observation())['actions'].size


def test_wrong_api_key_raises_connection_error_naming_http_401(server):
    with pytest.raises(ConnectionError, match='HTTP 401'):
        RemotePolicy(server.uri, api_key='wrong').infer(observation())


def test_reply_slower_than_timeout_raises_connection_error_and_next_call_reconnects(policy):
    class Slow:
        metadata: dict = {}
        release = threading.Event()

        def infer(self, obs: dict) -> dict:
            self.release.wait(30)
            return policy.infer(obs)

    slow = Slow()
    with ServerThread(slow, ServerConfig(port=0)) as s:
        remote = RemotePolicy(s.uri, timeout=0.3)
        with pytest.raises(ServerUnavailableError, match='no reply within'):
            remote.infer(observation())
        assert not remote.connected
        slow.release.set()
        remote.timeout = 120.0                                # the forward pass itself is slow
        assert remote.infer(observation())['actions'].size   # fresh connection, right answer
        assert remote.reconnects == 1


def test_request_during_server_shutdown_raises_connection_error_not_a_policy_error(policy, wait):
    class Gated:
        cfg = policy.cfg
        gate = threading.Event()

        def infer(self, obs: dict) -> dict:
            assert self.gate.wait(120)
            return policy.infer(obs)

    gated = Gated()
    s = ServerThread(gated, ServerConfig(port=0)).start()
    busy, late = RemotePolicy(s.uri, timeout=120.0), RemotePolicy(s.uri)
    late.connect()
    running = threading.Thread(target=busy.infer, args=(observation(),))
    running.start()
    assert wait(lambda: s.server.health()['busy'], timeout=60)
    stopping = threading.Thread(target=s.stop)
    stopping.start()
    assert wait(lambda: s.server.health()['status'] == 'shutting_down', timeout=60)
    with pytest.raises(ServerUnavailableError, match='shutting down'):
        late.infer(observation())   # the node holds and retries instead of failing
    gated.gate.set()
    running.join(120)
    stopping.join(120)
