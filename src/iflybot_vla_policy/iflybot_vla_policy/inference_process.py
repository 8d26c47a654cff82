"""A policy that runs in a child process: `infer(obs)` there, the caller's interpreter free.

The ROS node's executor and a model on a worker thread share one interpreter lock: with the
tiny model that lock, not the cores, slowed inference from 33 to 46 ms and stretched the
node's image-to-trajectory latency (docs/realtime.md). Here the model lives in its own process
(spawned, so no rclpy or DDS state is inherited); observations go over a pipe (two 128 px
frames are ~100 kB, a fraction of a millisecond) and the caller's thread waits with the lock
released. Same answers as in process: the child builds the same Policy with the same seed and
draws the same noise in the same order.
"""
from __future__ import annotations

import multiprocessing
import signal
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PolicySpec:
    """What the child loads: `Policy.from_checkpoint(checkpoint, ...)` when a checkpoint is
    given, else `Policy.from_config(preset, ...)`."""

    checkpoint: str = ''
    preset: str = 'tiny'
    seed: int = 0
    device: str = 'cpu'
    noise_scale: float | None = None     # None: the checkpoint's bundle.yaml, else 1
    torch_threads: int = 0               # 0: torch's default
    engine: dict[str, Any] = field(default_factory=dict)


def load_policy(spec: PolicySpec) -> Any:
    import torch

    from iflybot_vla_policy import bundle
    from iflybot_vla_policy.policy import Policy

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    if spec.checkpoint:
        return Policy.from_checkpoint(spec.checkpoint, seed=spec.seed, device=spec.device,
                                      noise_scale=spec.noise_scale, **spec.engine)
    return Policy.from_config(spec.preset, seed=spec.seed, device=spec.device,
                              noise_scale=bundle.noise_scale(None, spec.noise_scale),
                              **spec.engine)


def _serve(conn: Any, spec: PolicySpec) -> None:
    """Child: load, say so, then answer ('infer', obs) until ('close', None) or EOF. Ctrl-C
    reaches the whole process group; the parent ends the child (close, or EOF when it dies),
    so the child ignores SIGINT instead of printing a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        policy = load_policy(spec)
    except Exception as exc:  # noqa: BLE001 - the parent raises it with the child's traceback
        conn.send(('error', f'{type(exc).__name__}: {exc}', traceback.format_exc()))
        return
    conn.send(('ready', {'dt': float(policy.dt), 'noise_scale': policy.noise_scale}, ''))
    while True:
        try:
            kind, payload = conn.recv()
        except EOFError:
            return
        if kind == 'close':
            return
        try:
            obs, kwargs = payload
            conn.send(('ok', dict(policy.infer(obs, **kwargs)), ''))
        except Exception as exc:  # noqa: BLE001 - one bad observation does not end the child
            conn.send(('error', f'{type(exc).__name__}: {exc}', traceback.format_exc()))


class InferenceProcess:
    """`infer(obs)` answered by a Policy in a spawned child process. One call at a time (the
    node has one inference worker); a child that dies or hangs raises RuntimeError."""

    def __init__(self, spec: PolicySpec, start_timeout_s: float = 300.0,
                 infer_timeout_s: float = 60.0) -> None:
        self.spec = spec
        self.infer_timeout_s = infer_timeout_s
        context = multiprocessing.get_context('spawn')
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, spec), daemon=True,
                                        name='iflybot-inference')
        self._lock = threading.Lock()
        started = time.monotonic()
        self._process.start()
        child.close()
        kind, info, trace = self._receive(start_timeout_s, 'start')
        if kind != 'ready':
            self.close()
            raise RuntimeError(f'the inference process could not load the policy: {info}\n'
                               f'{trace}')
        self.dt: float = info['dt']
        self.noise_scale: float = info['noise_scale']
        self.start_s = time.monotonic() - started
        self.model_id = spec.checkpoint or f'{spec.preset} (random weights)'

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _receive(self, timeout: float, what: str) -> tuple:
        if not self._conn.poll(timeout):
            alive = self._process.is_alive()
            raise RuntimeError(f'the inference process did not answer ({what}) within '
                               f'{timeout:.0f} s' + ('' if alive else
                                                     f'; it exited with code '
                                                     f'{self._process.exitcode}'))
        try:
            return self._conn.recv()
        except (EOFError, OSError):   # OSError: ConnectionResetError when it was killed
            self._process.join(1.0)
            raise RuntimeError(f'the inference process exited ({what}) with code '
                               f'{self._process.exitcode}') from None

    def infer(self, obs: Mapping[str, Any], previous: np.ndarray | None = None,
              inference_delay: int = 0) -> dict[str, Any]:
        """obs, previous and inference_delay as for Policy.infer (real-time chunking); the
        same result dict, or the child's error re-raised as RuntimeError naming it."""
        kwargs = {} if previous is None else {'previous': np.asarray(previous),
                                              'inference_delay': int(inference_delay)}
        with self._lock:
            if not self._process.is_alive():
                raise RuntimeError(f'the inference process is gone (exit code '
                                   f'{self._process.exitcode})')
            try:
                self._conn.send(('infer', ({'images': dict(obs['images']),
                                            'state': obs['state'],
                                            'instruction': obs['instruction']}, kwargs)))
            except OSError:   # BrokenPipeError: it died since the last call
                self._process.join(1.0)
                raise RuntimeError(f'the inference process is gone (exit code '
                                   f'{self._process.exitcode})') from None
            kind, result, trace = self._receive(self.infer_timeout_s, 'infer')
        if kind != 'ok':
            raise RuntimeError(f'inference failed in the inference process: {result}')
        return result

    def close(self, timeout: float = 5.0) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(('close', None))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout)
        self._conn.close()
