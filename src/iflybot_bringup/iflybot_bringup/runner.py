"""Start a node graph without `ros2 launch`: one process per node, prefixed logs, lifecycle
autostart over lifecycle_msgs services, and a bounded clean shutdown.

What `ros2 launch` would do with the same graph, for machines that have only the rclpy wheels:
- each node runs as `<prefix>/lib/<package>/<executable> ARGS --ros-args -r __node:=NAME
  -r __ns:=NS --params-file F -p k:=v -r from:=to` (the ament index locates it, as `ros2 run`);
- lifecycle nodes with autostart are configured, then activated (`<node>/change_state`);
- Ctrl-C (or SIGTERM) sends SIGINT to every node once (each runs in its own process group, so a
  terminal's Ctrl-C does not reach it twice), then SIGTERM, then SIGKILL: all within
  `sigint_timeout + sigterm_timeout` (default 3 + 1 s). The recorder finalises its bag on SIGINT;
- a required node that exits ends the graph: exit status 1 when it failed, 0 when it exited 0;
  a node with `required: false` (the recorder, RViz) that fails is reported, the rest runs on,
  and the exit status at the end is 1.
Includes of other launch files, and nodes whose packages are not installed (franka_ros2, MoveIt,
RViz), are refused before anything starts, with the docker command to use instead.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from iflybot_bringup import graph as graph_mod
from iflybot_bringup.graph import ResolvedGraph, ResolvedNode
from iflybot_bringup.lifecycle_client import LifecycleClient

DOCKER_HINT = ('run it on a full ROS 2 install: the Docker image has franka_ros2, MoveIt and '
               'ros2 launch (docker/README.md), e.g. `docker compose -f docker/compose.yaml '
               '--profile {profile} up`, or `ros2 launch iflybot_bringup {graph}.launch.py` there')
_COLOURS = ('\033[36m', '\033[33m', '\033[35m', '\033[32m', '\033[34m', '\033[96m', '\033[93m',
            '\033[95m', '\033[92m', '\033[94m')
_RESET = '\033[0m'
_PR_SET_PDEATHSIG = 1


class PreflightError(RuntimeError):
    """The graph cannot start here; the message lists every reason and what to do instead."""


@dataclass(frozen=True)
class RunnerConfig:
    sigint_timeout: float = 3.0        # s from SIGINT to SIGTERM
    sigterm_timeout: float = 1.0       # s from SIGTERM to SIGKILL
    lifecycle_timeout: float = 180.0   # s for a lifecycle node to appear and finish configure
    colour: bool | None = None         # None: when stdout is a terminal and NO_COLOR is unset


# ----------------------------------------------------------------------------------- commands

def executable_path(node: ResolvedNode) -> Path | None:
    prefix = graph_mod.package_prefix(node.spec.package)
    if prefix is None:
        return None
    path = prefix / 'lib' / node.spec.package / node.spec.executable
    return path if path.is_file() and os.access(path, os.X_OK) else None


def format_param(value: Any) -> str:
    """A parameter value as rcl parses `-p name:=value` (YAML; strings quoted when needed)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    if text.endswith('\n...'):
        text = text[:-4].rstrip()
    elif text.endswith('...'):
        text = text[:-3].rstrip()
    return text


def command_line(node: ResolvedNode, executable: Path | str) -> list[str]:
    """argv of one node: the ROS 2 command-line arguments `ros2 launch` would pass."""
    argv = [str(executable), *node.arguments, '--ros-args', '-r', f'__node:={node.name}']
    if node.namespace:
        argv += ['-r', f'__ns:={node.namespace}']
    for path in node.params_files:
        argv += ['--params-file', str(path)]
    for key, value in node.params.items():
        argv += ['-p', f'{key}:={format_param(value)}']
    for src, dst in node.remaps:
        argv += ['-r', f'{src}:={dst}']
    return argv


def preflight(resolved: ResolvedGraph) -> dict[str, list[str]]:
    """Everything that stops the graph from starting here; {} when it can start.

    Raises PreflightError for launch-only graphs; returns node name -> argv otherwise.
    """
    graph = resolved.graph
    problems: list[str] = []        # need a full ROS 2 install (docker/)
    local: list[str] = []           # fixable here
    for inc in resolved.includes:
        problems.append(f'it includes {inc.package}/{inc.file}, a launch file only `ros2 launch` '
                        f'can start' + ('' if graph_mod.package_share(inc.package) else
                                        f' ({inc.package} is not installed here)'))
    commands: dict[str, list[str]] = {}
    for node in resolved.nodes:
        spec = node.spec
        missing = [p for p in (spec.package, *spec.requires) if graph_mod.package_share(p) is None]
        if spec.robot_description is not None:
            missing += [p for p in ('franka_description', 'franka_bringup', 'xacro')
                        if graph_mod.package_share(p) is None and p not in missing]
            problems.append(f'node {node.name} needs the FR3 URDF generated by xacro at launch '
                            f'time (robot_description), which only `ros2 launch` provides')
        if missing:
            problems.append(f'node {node.name} needs {", ".join(missing)}, not installed here')
            continue
        exe = executable_path(node)
        if exe is None:
            local.append(f'node {node.name}: no executable {spec.executable!r} in package '
                         f'{spec.package} (rebuild with `bash scripts/setup.sh`, then source '
                         f'env.sh)')
            continue
        for path in node.params_files:
            if not path.is_file():
                local.append(f'node {node.name}: parameter file {path} does not exist')
        commands[node.name] = command_line(node, exe)
    if problems:
        profile = 'robot' if graph.name in ('franka', 'home') else graph.name
        text = '\n'.join(f'  - {p}' for p in problems + local)
        raise PreflightError(
            f'graph {graph.name!r} cannot start without ros2 launch here:\n{text}\n'
            + DOCKER_HINT.format(profile=profile, graph=graph.name))
    if local:
        text = '\n'.join(f'  - {p}' for p in local)
        raise PreflightError(f'graph {graph.name!r} cannot start:\n{text}')
    return commands


# ----------------------------------------------------------------------------------- processes

@dataclass
class _Child:
    node: ResolvedNode
    argv: list[str]
    colour: str
    proc: subprocess.Popen[bytes] | None = None
    pump: threading.Thread | None = None
    returncode: int | None = None
    started: float = 0.0
    lifecycle_state: str = ''
    done_lifecycle: threading.Event = field(default_factory=threading.Event)


class GraphRunner:
    """Runs a resolved graph until Ctrl-C, SIGTERM or the exit of a required node."""

    def __init__(self, resolved: ResolvedGraph, config: RunnerConfig = RunnerConfig(),
                 out: IO[str] | None = None) -> None:
        self.resolved = resolved
        self.config = config
        self.out = out or sys.stdout
        self.commands = preflight(resolved)
        colour = config.colour
        if colour is None:
            colour = self.out.isatty() and 'NO_COLOR' not in os.environ
        self._colour = colour
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interrupts = 0
        self._failure: str | None = None
        self._lost: list[str] = []          # optional nodes that failed while the graph ran
        self._children = [
            _Child(node=n, argv=self.commands[n.name],
                   colour=_COLOURS[i % len(_COLOURS)] if colour else '')
            for i, n in enumerate(resolved.nodes)]
        width = max([len(c.node.name) for c in self._children] + [2])
        self._width = width
        self._ros: LifecycleClient | None = None
        self._up = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._stopped_in: float | None = None

    # -- logging
    def log(self, text: str, name: str = 'up', colour: str = '') -> None:
        reset = _RESET if colour else ''
        with self._lock:
            try:
                for line in text.splitlines() or ['']:
                    self.out.write(f'{colour}[{name:<{self._width}}]{reset} {line}\n')
                self.out.flush()
            except (OSError, ValueError):
                pass   # our output is gone (a closed pipe): keep draining the nodes' pipes

    def _pump(self, child: _Child) -> None:
        assert child.proc is not None and child.proc.stdout is not None
        for raw in iter(child.proc.stdout.readline, b''):
            self.log(raw.decode('utf-8', 'replace').rstrip('\n'), child.node.name, child.colour)
        child.proc.stdout.close()

    # -- signals
    def request_stop(self, reason: str = '') -> None:
        self._interrupts += 1
        if reason and not self._stop.is_set():
            self.log(reason)
        self._stop.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        self.request_stop(f'{name}: shutting down' if self._interrupts == 0 else
                          f'{name} again: hurrying the shutdown')

    # -- main
    def run(self, install_signal_handlers: bool = True) -> int:
        """Start every node, supervise until stopped, shut down; returns the exit status."""
        previous: dict[int, Any] = {}
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self._start_all()
            self._supervise()
        finally:
            code = self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    # -- programmatic use (e.g. the demo): with GraphRunner(...) as graph: graph.wait_until_up()
    def start(self) -> GraphRunner:
        """Start every node and supervise them on a background thread."""
        self._start_all()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name='graph-supervisor')
        self._supervisor.start()
        return self

    def wait_until_up(self, timeout: float | None = None) -> bool:
        """True once every node runs and every autostart lifecycle node finished its
        transitions; False on timeout or if the graph stopped first (see `failure`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._up.is_set():
            if self._stop.is_set():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            self._up.wait(0.05)
        return not self._stop.is_set() and self._failure is None

    @property
    def failure(self) -> str | None:
        """Why the graph failed (a required node died, a lifecycle transition failed)."""
        return self._failure

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def stop(self) -> int:
        """Shut every node down (SIGINT, SIGTERM, SIGKILL); returns the exit status."""
        if self._stopped_in is None:
            self._stop.set()
            if self._supervisor is not None:
                self._supervisor.join(timeout=5.0)
            self._stopped_in = self._shutdown()
            if self._ros is not None:
                self._ros.close()
            self.log(f'all nodes stopped in {self._stopped_in:.2f} s')
            for message in self._lost:
                self.log(f'FAILED: {message}; the graph ran on without it')
            if self._failure:
                self.log(f'FAILED: {self._failure}')
        return 1 if self._failure or self._lost else 0

    def __enter__(self) -> GraphRunner:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _start_all(self) -> None:
        graph = self.resolved.graph
        self.log(f'graph {graph.name!r}: {len(self._children)} nodes '
                 f'({", ".join(c.node.name for c in self._children)})')
        env = dict(os.environ)
        env.setdefault('PYTHONUNBUFFERED', '1')
        env.setdefault('RCUTILS_LOGGING_BUFFERED_STREAM', '0')
        env.setdefault('RCUTILS_COLORIZED_OUTPUT', '1' if self._colour else '0')
        prctl = _prctl()
        # every fork first, then the log threads (forking is safest before threads start)
        for child in self._children:
            if self._stop.is_set():
                break
            child.proc = subprocess.Popen(
                child.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=None if prctl is None else
                (lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)))
            child.started = time.monotonic()
        for child in self._children:
            if child.proc is None:
                continue
            child.pump = threading.Thread(target=self._pump, args=(child,), daemon=True,
                                          name=f'log-{child.node.name}')
            child.pump.start()
            self.log(f'started {child.node.fqn} (pid {child.proc.pid})')
        if self._stop.is_set():
            return
        lifecycle = [c for c in self._children if c.node.spec.lifecycle and c.node.spec.autostart]
        if lifecycle:
            self._ros = LifecycleClient()
            for child in lifecycle:
                threading.Thread(target=self._autostart, args=(child,), daemon=True,
                                 name=f'lifecycle-{child.node.name}').start()

    def _autostart(self, child: _Child) -> None:
        assert self._ros is not None
        try:
            for transition, goal in (('configure', 'inactive'), ('activate', 'active')):
                state = self._ros.transition(
                    child.node.fqn, transition, timeout=self.config.lifecycle_timeout,
                    alive=lambda: not self._stop.is_set() and child.proc is not None
                    and child.proc.poll() is None)
                if state is None:
                    return  # stopped, or the process died: the supervisor reports it
                child.lifecycle_state = state
                if state != goal:
                    raise RuntimeError(f'{transition} ended in state {state!r}, not {goal!r}')
            self.log(f'{child.node.fqn} is active')
        except Exception as exc:  # noqa: BLE001 - any failure of the lifecycle path is reported
            message = f'lifecycle node {child.node.name}: {exc}'
            if child.node.spec.required:
                self._failure = self._failure or message
                self.request_stop(f'{message}: shutting down')
            else:
                self.log(message)
        finally:
            child.done_lifecycle.set()

    def _supervise(self) -> None:
        announced = False
        while not self._stop.wait(0.05):
            running = 0
            for child in self._children:
                if child.proc is None or child.returncode is not None:
                    continue
                code = child.proc.poll()
                if code is None:
                    running += 1
                    continue
                child.returncode = code
                what = 'exited' if code >= 0 else f'was killed by {_signame(-code)}'
                self.log(f'{child.node.name} {what}' + (f' (code {code})' if code > 0 else ''))
                if child.node.spec.required:
                    if code != 0:
                        self._failure = self._failure or (
                            f'required node {child.node.name} {what}'
                            + (f' with code {code}' if code > 0 else ''))
                    self.request_stop(f'required node {child.node.name} ended: shutting down')
                    return
                self._optional_ended(child, what, code)
            if running == 0:
                self.request_stop('no node is running any more: shutting down')
                return
            lifecycle = [c for c in self._children
                         if c.node.spec.lifecycle and c.node.spec.autostart]
            if not announced and all(c.done_lifecycle.is_set() for c in lifecycle):
                announced = True
                active = [c.node.name for c in lifecycle if c.lifecycle_state == 'active']
                self.log(f'graph {self.resolved.graph.name!r} is up: {running} nodes running'
                         + (f', active: {", ".join(active)}' if active else ''))
                self._up.set()

    def _optional_ended(self, child: _Child, what: str, code: int) -> None:
        """A node with `required: false` ended while the graph ran: the rest runs on (a dead
        recorder ends the recording, not the robot's motion); a failure is said now and again
        at shutdown, and makes the exit status 1."""
        after = time.monotonic() - child.started
        if code == 0:
            self.log(f'optional node {child.node.name} exited after {after:.1f} s; the rest of '
                     f'the graph runs on')
            return
        message = (f'optional node {child.node.name} {what}'
                   + (f' with code {code}' if code > 0 else '') + f' after {after:.1f} s')
        self._lost.append(message)
        self.log(f'{message}: the rest of the graph runs on without it (required: false)')

    @property
    def lost(self) -> list[str]:
        """Optional nodes that failed while the graph ran (their exit did not end it)."""
        return list(self._lost)

    def _shutdown(self) -> float:
        t0 = time.monotonic()
        live = [c for c in self._children if c.proc is not None and c.proc.poll() is None]
        stages = ((signal.SIGINT, self.config.sigint_timeout),
                  (signal.SIGTERM, self.config.sigterm_timeout), (signal.SIGKILL, 1.0))
        for sig, timeout in stages:
            live = [c for c in live if c.proc is not None and c.proc.poll() is None]
            if not live:
                break
            if sig != signal.SIGINT:
                self.log(f'{sig.name} to {", ".join(c.node.name for c in live)}')
            for child in live:
                _signal_group(child, sig)
            interrupts = self._interrupts
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(c.proc.poll() is None for c in live
                                                      if c.proc is not None):
                if sig == signal.SIGINT and self._interrupts > max(interrupts, 1):
                    break  # a second Ctrl-C: go on to SIGTERM now
                time.sleep(0.02)
        for child in self._children:
            if child.proc is not None:
                try:
                    child.proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
                if child.returncode is None:
                    child.returncode = child.proc.returncode
            if child.pump is not None:
                child.pump.join(timeout=1.0)
        return time.monotonic() - t0


def _signal_group(child: _Child, sig: signal.Signals) -> None:
    assert child.proc is not None
    try:
        os.killpg(child.proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            child.proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f'signal {num}'


def _prctl() -> Any:
    """Linux prctl, resolved in the parent: the child asks for SIGTERM if the runner dies
    without shutting it down (PR_SET_PDEATHSIG). None where unavailable."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------------- entry

def describe_args(graph: graph_mod.Graph) -> str:
    lines = [f'graph {graph.name!r}: {graph.description}', 'arguments:']
    for arg in graph.args:
        extra = f', one of {", ".join(arg.choices)}' if arg.choices else ''
        lines.append(f"  {arg.name} ({arg.type}, default '{arg.default}'{extra}): "
                     f'{arg.description}')
    lines.append('nodes: ' + ', '.join(
        n.name + (f' [if {n.condition.arg}]' if n.condition and not n.condition.negate else '')
        + (f' [unless {n.condition.arg}]' if n.condition and n.condition.negate else '')
        for n in graph.nodes))
    if graph.includes:
        lines.append('includes (ros2 launch only): '
                     + ', '.join(f'{i.package}/{i.file}' for i in graph.includes))
    return '\n'.join(lines)


def up(graph_name: str, overrides: Sequence[str] = (), config: RunnerConfig = RunnerConfig(),
       dry_run: bool = False, show_args: bool = False, out: IO[str] | None = None) -> int:
    """`iflybot up GRAPH [key:=value ...]`: returns the exit status."""
    out = out or sys.stdout
    try:
        graph = graph_mod.load_graph(graph_name)
        if show_args:
            out.write(describe_args(graph) + '\n')
            return 0
        resolved = graph_mod.resolve(graph, graph_mod.parse_overrides(overrides))
        if dry_run:
            for name, argv in preflight(resolved).items():
                out.write(f'{name}: {subprocess.list2cmdline(argv)}\n')
            return 0
        runner = GraphRunner(resolved, config, out=out)
    except (graph_mod.GraphError, PreflightError) as exc:
        print(f'iflybot up: {exc}', file=sys.stderr)
        return 2
    return runner.run()
