"""Benchmark: remote inference over `iflybot serve` on localhost versus the policy in-process.

Round trip: the same observations alternately through the local policy and a RemotePolicy
talking to an `iflybot serve` child process (same preset, seed and thread count), so both see the
same machine load; the overhead is remote minus local (ms) and their ratio. On a busy machine
that difference is noisy, so we also report the transport cost per request: its round trip minus
the forward pass the server timed for it (encode, send, decode, both ways). Throughput: 1, 4 and
8 concurrent clients against a server that batches requests queued during a forward pass and
against one that runs them one by one (`--max-batch 1`, the naive baseline), alternating.
"""
from __future__ import annotations

import statistics
import threading
import time

import numpy as np

from iflybot_vla_policy.remote import RemotePolicy
from iflybot_vla_policy.serving import codec
from iflybot_vla_policy.serving.process import ServerProcess

PRESET = 'tiny'
IMAGE_SIZE = 224    # what openpi clients typically send: two 224x224 RGB cameras, ~300 kB


def observation(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        'images': {name: rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
                   for name in ('scene_camera', 'wrist_camera')},
        'state': np.concatenate([rng.uniform(-0.5, 0.5, 7), [0.04]]).astype(np.float32),
        'instruction': 'pick up the red cube',
    }


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {'median_ms': statistics.median(ordered) * 1e3, 'min_ms': ordered[0] * 1e3,
            'p90_ms': ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1e3}


def round_trip(policy, uri: str, repeats: int) -> dict:
    """Alternate local and remote calls on the same observations."""
    obs = [observation(i) for i in range(repeats)]
    local_s, remote_s, server_ms, transport_ms = [], [], [], []
    with RemotePolicy(uri, timeout=120.0) as remote:
        remote.infer(obs[0])
        policy.infer(obs[0])                      # warm both paths
        for o in obs:
            start = time.perf_counter()
            policy.infer(o)
            local_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = remote.infer(o)
            remote_s.append(time.perf_counter() - start)
            timing = result['server_timing']
            server_ms.append(timing['infer_ms'])
            # What the wire costs this request: its round trip minus the server's own work.
            transport_ms.append(remote_s[-1] * 1e3 - timing['infer_ms'] - timing['queue_ms'])
    encode_s = []
    for o in obs:
        start = time.perf_counter()
        codec.unpack(codec.pack(o))
        encode_s.append(time.perf_counter() - start)
    local, remote = _ms(local_s), _ms(remote_s)
    return {
        'observation_bytes': len(codec.pack(obs[0])),
        'local': local,
        'remote': remote,
        'server_infer_median_ms': statistics.median(server_ms),
        'overhead_ms': remote['median_ms'] - local['median_ms'],
        'ratio_remote_over_local': remote['median_ms'] / local['median_ms'],
        'transport_median_ms': statistics.median(transport_ms),
        'codec_pack_unpack_median_ms': statistics.median(encode_s) * 1e3,
    }


def throughput(uri: str, clients: int, requests_per_client: int) -> dict:
    """Requests/s with `clients` threads, each with its own connection, all starting together."""
    remotes = [RemotePolicy(uri, timeout=300.0) for _ in range(clients)]
    for i, remote in enumerate(remotes):
        remote.infer(observation(i))   # connect and warm up outside the timed window
    barrier = threading.Barrier(clients + 1)
    latencies: list[float] = []
    batch_sizes: list[int] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        obs = observation(100 + i)
        barrier.wait()
        for _ in range(requests_per_client):
            start = time.perf_counter()
            result = remotes[i].infer(obs)
            with lock:
                latencies.append(time.perf_counter() - start)
                batch_sizes.append(result['server_timing']['batch_size'])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for remote in remotes:
        remote.close()
    return {'requests_per_s': clients * requests_per_client / wall,
            'latency_median_ms': statistics.median(latencies) * 1e3,
            'mean_batch_size': float(np.mean(batch_sizes))}


def run(quick: bool = False) -> dict:
    import torch

    from iflybot_vla_policy.policy import Policy

    threads = torch.get_num_threads()
    env = {'OMP_NUM_THREADS': str(threads)}
    policy = Policy.from_config(PRESET, seed=0)
    batched_supported = callable(getattr(policy, 'infer_batch', None))
    repeats, rounds, per_client = (5, 1, 2) if quick else (30, 3, 4)
    result: dict = {'preset': PRESET, 'image_size': IMAGE_SIZE, 'torch_threads': threads,
                    'policy_has_infer_batch': batched_supported}
    modes = {'batched': 8, 'one_by_one': 1} if batched_supported else {'one_by_one': 1}
    servers = {mode: ServerProcess(preset=PRESET, env=env, extra_args=[
        '--max-batch', str(max_batch), '--log-level', 'warning']) for mode, max_batch in
        modes.items()}
    try:
        uris = {mode: server.start() for mode, server in servers.items()}
        result['round_trip'] = round_trip(policy, uris['one_by_one'], repeats)
        # Both servers stay up (idle costs nothing) and the modes alternate within each round,
        # so load from other processes on this machine hits both alike; medians over rounds.
        samples: dict[str, dict[int, list[dict]]] = {m: {1: [], 4: [], 8: []} for m in modes}
        for _ in range(rounds):
            for clients in (1, 4, 8):
                for mode in modes:
                    samples[mode][clients].append(throughput(uris[mode], clients, per_client))
        for mode in modes:
            result[f'throughput_{mode}'] = {
                f'clients_{n}': {key: statistics.median(run[key] for run in runs)
                                 for key in runs[0]}
                for n, runs in samples[mode].items()}
    finally:
        for server in servers.values():
            server.close()
    if batched_supported:
        result['batching_speedup_8_clients'] = (
            result['throughput_batched']['clients_8']['requests_per_s']
            / result['throughput_one_by_one']['clients_8']['requests_per_s'])
    return result
