"""`iflybot serve` in a child process, for tests, benchmarks and scripts that need a real server.

Starts on a free port chosen by the OS (``--port 0``; the port is read from the server's ready
line), and restarts on that same port, so a client configured with the URI sees "server gone,
server back" exactly as with a real remote machine.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from iflybot_vla_policy.serving import API_KEY_ENV, READY_PREFIX


class ServerProcess:
    """One `iflybot serve` child: start(), stop() (SIGTERM), kill() (SIGKILL), restart()."""

    def __init__(self, *, preset: str | None = 'tiny', checkpoint: str | Path | None = None,
                 host: str = '127.0.0.1', port: int = 0, api_key: str | None = None,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        if (preset is None) == (checkpoint is None):
            raise ValueError('give exactly one of preset and checkpoint')
        self.host = host
        self.port = port
        self._source = (['--checkpoint', str(checkpoint)] if checkpoint is not None
                        else ['--preset', str(preset)])
        self._extra_args = list(extra_args)
        self._env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'),
                     **(env or {})}
        self._env.pop(API_KEY_ENV, None)
        if api_key is not None:
            self._env[API_KEY_ENV] = api_key   # not on the command line, where ps shows it
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix='iflybot-serve-', suffix='.log',
                                                delete=False)
        self.log_path = Path(self._log.name)

    @property
    def uri(self) -> str:
        return f'ws://{self.host}:{self.port}'

    @property
    def health_url(self) -> str:
        return f'http://{self.host}:{self.port}/healthz'

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 300.0) -> str:
        """Start the server and wait for its ready line; returns the URI."""
        if self.running:
            raise RuntimeError(f'server already running on {self.uri}')
        command = [sys.executable, '-m', 'iflybot_vla_policy.cli', 'serve', *self._source,
                   '--host', self.host, '--port', str(self.port), *self._extra_args]
        self._proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log,
                                      stdin=subprocess.DEVNULL, env=self._env, text=True)
        ready = threading.Event()

        def read_stdout(proc: subprocess.Popen) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:   # keep draining after the ready line: never block the child
                if line.startswith(READY_PREFIX) and not ready.is_set():
                    self.port = int(line.strip().rsplit(':', 1)[1])
                    ready.set()

        threading.Thread(target=read_stdout, args=(self._proc,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f'iflybot serve did not start within {timeout:.0f} s; '
                                   f'log tail:\n{self.log_tail()}')
        return self.uri

    def stop(self, timeout: float = 15.0) -> int | None:
        """Graceful stop (SIGTERM, as systemd or docker would); SIGKILL after timeout."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def kill(self) -> None:
        """Abrupt death (a crash or a pulled cable as the client sees it)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def restart(self, timeout: float = 300.0) -> str:
        """Stop if running, then start again on the same port."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors='replace')[-chars:]

    def close(self) -> None:
        self.stop()
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
