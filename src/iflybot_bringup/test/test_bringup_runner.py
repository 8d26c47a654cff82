"""`iflybot up` with real processes: real rclpy nodes over DDS started from a graph YAML."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bringup_testing import (
    TEST_PACKAGE,
    ament_prefix_fixture,  # noqa: F401 (a fixture)
    read_report,
    wait_for,
)

from iflybot_bringup import graph as graph_mod
from iflybot_bringup import runner
from iflybot_bringup.lifecycle_client import LifecycleClient

pytestmark = pytest.mark.ros


def _dummy(name: str, report: Path, **fields: object) -> dict[str, object]:
    params = dict(fields.pop('params', {}) or {})
    params['report'] = str(report)
    return {'name': name, 'package': TEST_PACKAGE, 'executable': 'dummy_node',
            'params': params, **fields}


def _write_graph(path: Path, nodes: list[dict[str, object]],
                 args: dict[str, object] | None = None) -> Path:
    path.write_text(yaml.safe_dump({'description': 'test graph', 'args': args or {},
                                    'nodes': nodes}))
    return path


class Up:
    """`iflybot up GRAPH` in a subprocess, its output in a file."""

    def __init__(self, graph: Path, tmp_path: Path, *overrides: str) -> None:
        self.log = tmp_path / 'up.log'
        self._file = self.log.open('w')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'iflybot_vla_policy.cli', 'up', str(graph), *overrides],
            stdout=self._file, stderr=subprocess.STDOUT, env=dict(os.environ))

    def output(self) -> str:
        return self.log.read_text()

    def interrupt_and_wait(self) -> int:
        """Ctrl-C: SIGINT to the runner; returns its exit status."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=20)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._file.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_nodes_get_name_namespace_parameters_and_remaps_and_ctrl_c_ends_all_cleanly(
        ament_prefix: Path, tmp_path: Path) -> None:
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(yaml.safe_dump({'/**': {'ros__parameters': {'count': 7,
                                                                       'label': 'file'}}}))
    a, b = tmp_path / 'a.json', tmp_path / 'b.json'
    graph = _write_graph(tmp_path / 'g.yaml', args={
        'words': {'default': 'pick up the red cube'},
        'flag': {'default': True, 'type': 'bool'},
        'empty': {'default': ''},
    }, nodes=[
        _dummy('alpha', a, params_files=[str(params_file)],
               params={'label': '$(arg words)', 'flag': '$(arg flag)', 'ratio': 0.5,
                       'values': [1.5, 2.5]},
               remaps={'chatter': '/remapped/chatter'}),
        _dummy('beta', b, namespace='team', params={'label': '$(arg empty)', 'count': 3}),
    ])
    up = Up(graph, tmp_path, 'flag:=false')
    try:
        assert wait_for(lambda: read_report(a) and read_report(b), timeout=60), up.output()
        ra, rb = read_report(a), read_report(b)
        assert (ra['name'], ra['namespace']) == ('alpha', '/')
        assert (rb['name'], rb['namespace']) == ('beta', '/team')
        # the params file gives count; inline params win over it (they come later)
        assert ra['params']['count'] == 7
        assert ra['params']['label'] == 'pick up the red cube'
        assert ra['params']['flag'] is False
        assert ra['params']['ratio'] == 0.5 and ra['params']['values'] == [1.5, 2.5]
        assert ra['chatter'] == '/remapped/chatter'
        assert rb['params']['label'] == '' and rb['params']['count'] == 3
        assert rb['chatter'] == '/team/chatter'
        assert wait_for(lambda: "graph 'g' is up" in up.output(), timeout=30), up.output()
        code = up.interrupt_and_wait()
        out = up.output()
        assert code == 0, out
        assert read_report(a)['events'][-1] == 'clean shutdown'
        assert read_report(b)['events'][-1] == 'clean shutdown'
        assert '[alpha' in out and '[beta' in out   # node logs come prefixed
    finally:
        up.close()


def test_a_node_that_ignores_sigint_is_escalated_to_sigterm_and_others_finalise(
        ament_prefix: Path, tmp_path: Path) -> None:
    stubborn, slow = tmp_path / 'stubborn.json', tmp_path / 'slow.json'
    graph = _write_graph(tmp_path / 'g.yaml', nodes=[
        _dummy('stubborn', stubborn, params={'ignore_sigint': True}),
        # finalises for 1 s after SIGINT (as a recorder closing its bag) and must not be cut off
        _dummy('slow', slow, params={'shutdown_delay': 1.0}),
    ])
    up = Up(graph, tmp_path)
    try:
        assert wait_for(lambda: read_report(stubborn) and read_report(slow), timeout=60)
        assert wait_for(lambda: "graph 'g' is up" in up.output(), timeout=30), up.output()
        pids = [int(line.rsplit('pid ', 1)[1].rstrip(')'))
                for line in up.output().splitlines() if '(pid ' in line]
        assert len(pids) == 2
        code = up.interrupt_and_wait()
        out = up.output()
        assert code == 0, out
        assert 'SIGTERM to stubborn' in out
        assert read_report(slow)['events'][-1] == 'clean shutdown', out
        assert not any(_alive(pid) for pid in pids)
    finally:
        up.close()


def test_nodes_do_not_outlive_a_runner_killed_with_sigkill(
        ament_prefix: Path, tmp_path: Path) -> None:
    report = tmp_path / 'orphan.json'
    graph = _write_graph(tmp_path / 'g.yaml', nodes=[_dummy('orphan', report)])
    up = Up(graph, tmp_path)
    try:
        assert wait_for(lambda: read_report(report), timeout=60), up.output()
        pid = int(up.output().split('(pid ', 1)[1].split(')', 1)[0])
        up.proc.kill()
        up.proc.wait()
        assert wait_for(lambda: not _alive(pid), timeout=10)
        assert read_report(report)['events'][-1] == 'clean shutdown'   # SIGTERM, handled
    finally:
        up.close()


def test_death_of_a_required_node_ends_the_graph_with_nonzero_exit(
        ament_prefix: Path, tmp_path: Path) -> None:
    crash, other, optional = tmp_path / 'crash.json', tmp_path / 'other.json', tmp_path / 'o.json'
    graph = _write_graph(tmp_path / 'g.yaml', nodes=[
        _dummy('optional', optional, required=False,
               params={'exit_after': 0.2, 'exit_code': 4}),
        _dummy('crasher', crash, params={'exit_after': 3.0, 'exit_code': 3}),
        _dummy('bystander', other),
    ])
    up = Up(graph, tmp_path)
    try:
        code = up.proc.wait(timeout=60)
        out = up.output()
        assert code == 1, out
        assert 'required node crasher exited with code 3' in out
        # the optional node's exit did not end the graph; the crash did, and stopped the rest
        assert read_report(optional)['events'][-1] == 'exit 4'
        assert read_report(crash)['events'][-1] == 'exit 3'
        assert read_report(other)['events'][-1] == 'clean shutdown'
    finally:
        up.close()


def _pid_of(output: str, name: str) -> int:
    """The pid `iflybot up` logged for node `name` ('started /name (pid N)')."""
    line = next(line for line in output.splitlines() if f'started /{name} (pid ' in line)
    return int(line.rsplit('pid ', 1)[1].rstrip(')'))


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGKILL])
def test_an_optional_node_stopped_by_a_signal_leaves_the_rest_running_and_is_reported(
        ament_prefix: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """Issue 27 item 6: a recorder (required: false) that is killed ends the recording, not the
    graph; a failure is named when it happens and at shutdown, and the exit status says it."""
    rec, sim = tmp_path / 'rec.json', tmp_path / 'sim.json'
    graph = _write_graph(tmp_path / 'g.yaml', nodes=[
        _dummy('recorder', rec, required=False), _dummy('sim', sim)])
    up = Up(graph, tmp_path)
    try:
        assert wait_for(lambda: read_report(rec) and read_report(sim), timeout=60), up.output()
        assert wait_for(lambda: "graph 'g' is up" in up.output(), timeout=30), up.output()
        os.kill(_pid_of(up.output(), 'recorder'), sig)
        assert wait_for(lambda: 'optional node recorder' in up.output(), timeout=30), \
            up.output()
        # the runner and the required node run on
        assert up.proc.poll() is None, up.output()
        assert _alive(_pid_of(up.output(), 'sim'))
        assert 'shutting down' not in up.output()
        code = up.interrupt_and_wait()
        out = up.output()
        assert read_report(sim)['events'][-1] == 'clean shutdown'
        if sig == signal.SIGKILL:
            assert ('optional node recorder was killed by SIGKILL after' in out
                    and 'the rest of the graph runs on without it' in out), out
            assert 'FAILED: optional node recorder was killed by SIGKILL' in out
            assert code == 1, out
        else:      # rclpy turns SIGTERM into a clean shutdown: an ending, not a failure
            assert read_report(rec)['events'][-1] == 'clean shutdown'
            assert 'optional node recorder exited after' in out, out
            assert code == 0, out
    finally:
        up.close()


def test_lifecycle_nodes_with_autostart_are_configured_and_activated(
        ament_prefix: Path, tmp_path: Path) -> None:
    managed, manual = tmp_path / 'managed.json', tmp_path / 'manual.json'
    graph = _write_graph(tmp_path / 'g.yaml', nodes=[
        _dummy('managed', managed, lifecycle=True, arguments=['--lifecycle']),
        _dummy('manual', manual, lifecycle=True, autostart=False, arguments=['--lifecycle']),
    ])
    up = Up(graph, tmp_path)
    try:
        assert wait_for(lambda: '/managed is active' in up.output(), timeout=60), up.output()
        assert read_report(managed)['events'][:3] == ['started', 'configure', 'activate']
        # The two processes start independently: 'manual' may not have reported yet.
        assert wait_for(lambda: 'events' in read_report(manual), timeout=60), up.output()
        assert read_report(manual)['events'] == ['started']
        code = up.interrupt_and_wait()
        assert code == 0, up.output()
    finally:
        up.close()


def test_failed_configure_of_a_required_lifecycle_node_fails_the_graph(
        ament_prefix: Path, tmp_path: Path) -> None:
    report = tmp_path / 'r.json'
    graph = _write_graph(tmp_path / 'g.yaml', nodes=[
        _dummy('broken', report, lifecycle=True, arguments=['--lifecycle'],
               params={'fail_configure': True})])
    up = Up(graph, tmp_path)
    try:
        code = up.proc.wait(timeout=60)
        out = up.output()
        assert code == 1, out
        assert 'lifecycle node broken: configure failed' in out
        assert read_report(report)['events'][-1] == 'clean shutdown'
    finally:
        up.close()


def test_a_program_can_hold_a_graph_up_in_a_with_block(
        ament_prefix: Path, tmp_path: Path) -> None:
    report, log = tmp_path / 'r.json', tmp_path / 'log.txt'
    graph = _write_graph(tmp_path / 'g.yaml', nodes=[
        _dummy('held', report, lifecycle=True, arguments=['--lifecycle'])])
    resolved = graph_mod.resolve(graph_mod.load_graph(graph))
    with log.open('w') as out, runner.GraphRunner(resolved, out=out) as held:
        assert held.wait_until_up(timeout=60), log.read_text()
        assert held.running and held.failure is None
        assert read_report(report)['events'][-1] == 'activate'
    assert read_report(report)['events'][-1] == 'clean shutdown'
    assert held.stop() == 0 and not held.running


def test_up_franka_stops_before_starting_anything_and_points_to_docker(
        capsys: pytest.CaptureFixture[str]) -> None:
    if graph_mod.package_share('franka_bringup') is not None:
        pytest.skip('franka_ros2 is installed here: the franka graph needs ros2 launch anyway')
    code = runner.up('franka', ['robot_ip:=10.0.0.2'])
    err = capsys.readouterr().err
    assert code == 2
    assert 'franka_bringup/launch/franka.launch.py' in err
    assert 'moveit_servo' in err and 'docker' in err


def test_a_missing_parameter_file_is_named_before_anything_starts(
        ament_prefix: Path, tmp_path: Path) -> None:
    graph = _write_graph(tmp_path / 'g.yaml', nodes=[
        _dummy('alpha', tmp_path / 'a.json', params_files=['config/not_there.yaml'])])
    with pytest.raises(runner.PreflightError, match=r'alpha: parameter file .*not_there.yaml'):
        runner.preflight(graph_mod.resolve(graph_mod.load_graph(graph)))
    assert not (tmp_path / 'a.json').exists()


def test_dry_run_prints_each_node_command_line_of_the_sim_graph(
        capsys: pytest.CaptureFixture[str]) -> None:
    missing = [p for p in ('config/sim.yaml', 'config/policy.yaml')
               if not (graph_mod.bringup_dir() / p).is_file()]
    if missing:
        pytest.skip(f'not landed yet: {missing}')
    assert runner.up('sim', ['checkpoint:=/ckpt', 'instruction:=stack the cubes'],
                     dry_run=True) == 0
    lines = dict(line.split(': ', 1) for line in capsys.readouterr().out.splitlines())
    assert set(lines) == {'iflybot_sim', 'iflybot_policy'}
    policy = lines['iflybot_policy']
    assert policy.split()[0].endswith('lib/iflybot_vla_policy/iflybot_policy')
    assert '-r __node:=iflybot_policy' in policy and 'config/policy.yaml' in policy
    assert '-p checkpoint:=/ckpt' in policy and '"instruction:=stack the cubes"' in policy
    assert '-p use_sim_time:=true' in policy


@pytest.mark.parametrize('value, text', [
    ('', "''"), ('true', "'true'"), ('pick up the cube', 'pick up the cube'), (True, 'true'),
    (3, '3'), (0.25, '0.25'), ([1.5, 2.0], '[1.5, 2.0]'), ('1.0', "'1.0'")])
def test_parameter_values_are_written_as_rcl_parses_them(value: object, text: str) -> None:
    assert runner.format_param(value) == text


class _LateLifecycleServer:
    """change_state/get_state services whose first change_state reply is held back until
    close() (as if DDS had lost it), while get_state answers."""

    def __init__(self, name: str) -> None:
        import threading

        import rclpy
        from lifecycle_msgs.srv import ChangeState, GetState
        from rclpy.callback_groups import ReentrantCallbackGroup
        from rclpy.executors import MultiThreadedExecutor

        self.state, self.requests = 'unconfigured', 0
        self.release = threading.Event()
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(name, context=self.context)
        group = ReentrantCallbackGroup()
        self.node.create_service(ChangeState, f'/{name}/change_state', self._change,
                                 callback_group=group)
        self.node.create_service(GetState, f'/{name}/get_state', self._get, callback_group=group)
        self.executor = MultiThreadedExecutor(num_threads=3, context=self.context)
        self.executor.add_node(self.node)
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _change(self, request, response):
        self.requests += 1
        goal = {1: ('unconfigured', 'inactive'), 3: ('inactive', 'active')}[request.transition.id]
        response.success = self.state == goal[0]
        if response.success:
            self.state = goal[1]
        if self.requests == 1:
            self.release.wait(120)
        return response

    def _get(self, _request, response):
        response.current_state.label = self.state
        return response

    def close(self) -> None:
        import rclpy
        self.release.set()
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)


def test_a_lost_change_state_reply_is_recovered_from_the_node_state() -> None:
    server = _LateLifecycleServer('late_lifecycle')
    client = LifecycleClient()
    try:
        state = client.transition('/late_lifecycle', 'configure', timeout=30.0,
                                  alive=lambda: True, retry_s=1.0)
        assert state == 'inactive' and server.requests == 1   # not asked twice
        assert client.transition('/late_lifecycle', 'activate', timeout=30.0,
                                 alive=lambda: True, retry_s=1.0) == 'active'
    finally:
        client.close()
        server.close()
