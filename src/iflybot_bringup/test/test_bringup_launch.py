"""The launch files against their graphs, through a test double of the launch API.

launch and launch_ros exist only on a full ROS 2 install (docker/). Here fake `launch*` modules
record every action the builder creates; a small evaluator performs their substitutions with
given launch arguments, the way `ros2 launch` would, and the result must equal what the runner
starts for the same arguments: one graph, two front ends, the same nodes. Where launch_ros is
installed, the real launch files are loaded too.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from bringup_testing import (
    TEST_PACKAGE,
    ament_prefix_fixture,  # noqa: F401 (a fixture)
    read_report,
)

from iflybot_bringup import graph as graph_mod
from iflybot_bringup import launch_builder

LAUNCH_DIR = graph_mod.bringup_dir() / 'launch'
GRAPHS = ('franka', 'sim', 'gazebo', 'record', 'home')


class Recorded:
    """An action or substitution of the fake launch API: keeps its arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f'{type(self).__name__}{self.args}{self.kwargs}'


_FAKES = {
    'launch': ['LaunchDescription', 'Condition', 'LaunchDescriptionSource'],
    'launch.actions': ['DeclareLaunchArgument', 'IncludeLaunchDescription', 'Shutdown',
                       'EmitEvent', 'RegisterEventHandler'],
    'launch.substitutions': ['LaunchConfiguration', 'PathJoinSubstitution', 'Command',
                             'FindExecutable'],
    'launch.conditions': ['IfCondition', 'UnlessCondition'],
    'launch.launch_description_sources': ['PythonLaunchDescriptionSource'],
    'launch.event_handlers': ['OnProcessStart'],
    'launch.events': ['matches_action'],
    'launch_ros': [],
    'launch_ros.actions': ['Node', 'LifecycleNode'],
    'launch_ros.substitutions': ['FindPackageShare'],
    'launch_ros.parameter_descriptions': ['ParameterValue', 'ParameterFile'],
    'launch_ros.event_handlers': ['OnStateTransition'],
    'launch_ros.events': [],
    'launch_ros.events.lifecycle': ['ChangeState'],
}


@pytest.fixture
def fake_launch(monkeypatch: pytest.MonkeyPatch) -> dict[str, type]:
    """Install the fake launch modules; returns class name -> class."""
    classes: dict[str, type] = {}
    for module_name, names in _FAKES.items():
        module = types.ModuleType(module_name)
        module.__path__ = []  # type: ignore[attr-defined] - a package, for submodule imports
        for name in names:
            cls = type(name, (Recorded,), {})
            classes[name] = cls
            setattr(module, name, cls)
        monkeypatch.setitem(sys.modules, module_name, module)
    return classes


# ----------------------------------------------------------------------------------- evaluator

def evaluate(value: Any, args: dict[str, str]) -> Any:
    """Perform the fake substitutions as launch would, to a plain value."""
    kind = type(value).__name__
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ''.join(str(evaluate(v, args)) for v in value)
    if kind == 'LaunchConfiguration':
        return args[value.args[0]]
    if kind == 'FindPackageShare':
        share = graph_mod.package_share(value.args[0])
        return str(share) if share else f'<share of {value.args[0]}>'
    if kind == 'PathJoinSubstitution':
        return os.path.join(*(str(evaluate(p, args)) for p in value.args[0]))
    if kind == 'FindExecutable':
        return value.kwargs['name']
    if kind == 'Command':
        return f'$({evaluate(value.args[0], args)})'
    if kind == 'ParameterValue':
        text = evaluate(value.args[0], args)
        return text if value.kwargs.get('value_type') is str else yaml.safe_load(text)
    if kind == 'ParameterFile':
        return Path(evaluate(value.args[0], args))
    raise AssertionError(f'unexpected launch object {value!r}')


def condition_holds(condition: Any, args: dict[str, str]) -> bool:
    if condition is None:
        return True
    value = graph_mod.parse_bool(evaluate(condition.args[0], args), 'condition')
    return value if type(condition).__name__ == 'IfCondition' else not value


def launched_nodes(description: Any, args: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What `ros2 launch` would start: node fqn -> evaluated Node kwargs (+ its action)."""
    nodes = {}
    for entity in description.args[0]:
        if type(entity).__name__ not in ('Node', 'LifecycleNode'):
            continue
        kw = entity.kwargs
        if not condition_holds(kw['condition'], args):
            continue
        namespace = evaluate(kw['namespace'], args).strip('/')
        files, params = [], {}
        for item in kw['parameters']:
            if isinstance(item, dict):
                params.update({k: _evaluate_param(v, args) for k, v in item.items()})
            else:
                files.append(evaluate(item, args))
        fqn = f'/{namespace}/{kw["name"]}' if namespace else f'/{kw["name"]}'
        nodes[fqn] = {
            'action': entity, 'package': kw['package'], 'executable': kw['executable'],
            'params_files': tuple(files), 'params': params,
            'remaps': tuple((evaluate(s, args), evaluate(d, args)) for s, d in kw['remappings']),
            'arguments': tuple(evaluate(a, args) for a in kw['arguments']),
            'required': type(kw.get('on_exit')).__name__ == 'Shutdown'}
    return nodes


def _evaluate_param(value: Any, args: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_evaluate_param(v, args) for v in value]
    if isinstance(value, dict):
        return {k: _evaluate_param(v, args) for k, v in value.items()}
    if isinstance(value, (str, bool, int, float)):
        return value
    return evaluate(value, args)


def load_launch_file(name: str) -> Any:
    path = LAUNCH_DIR / f'{name}.launch.py'
    spec = importlib.util.spec_from_file_location(f'{name}_launch', path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_launch_description()


ARG_CASES = [
    ('franka', {}),
    ('franka', {'record': 'true', 'rviz': 'false', 'load_gripper': 'false', 'servo': 'false',
                'namespace': 'arm1', 'checkpoint': '/ckpt', 'instruction': 'stack the cubes'}),
    ('sim', {}),
    ('sim', {'record': 'true', 'instruction': 'open the drawer', 'checkpoint': '1'}),
    ('gazebo', {'record': 'true'}),
    ('record', {}),
    ('record', {'robot': 'true', 'expert': 'false'}),
    ('home', {'velocity_scaling': '0.5'}),
]


# ----------------------------------------------------------------------------------- tests

@pytest.mark.parametrize('name, overrides', ARG_CASES)
def test_launch_file_starts_the_nodes_the_runner_starts_for_the_same_arguments(
        fake_launch: dict[str, type], name: str, overrides: dict[str, str]) -> None:
    graph = graph_mod.load_graph(name)
    resolved = graph_mod.resolve(graph, overrides)
    launched = launched_nodes(load_launch_file(name), dict(resolved.values))
    assert set(launched) == {n.fqn for n in resolved.nodes}
    for node in resolved.nodes:
        got = launched[node.fqn]
        assert (got['package'], got['executable']) == (node.spec.package, node.spec.executable)
        assert got['params_files'] == node.params_files
        own = {k: got['params'][k] for k in node.params}
        assert own == dict(node.params)
        assert all(type(v) is type(node.params[k]) for k, v in own.items())
        assert got['remaps'] == node.remaps
        assert got['arguments'] == node.arguments
        assert got['required'] == node.spec.required
        assert type(got['action']).__name__ == ('LifecycleNode' if node.spec.lifecycle
                                                else 'Node')


@pytest.mark.parametrize('name', GRAPHS)
def test_launch_file_declares_every_graph_argument_with_default_and_description(
        fake_launch: dict[str, type], name: str) -> None:
    graph = graph_mod.load_graph(name)
    declared = {e.args[0]: e.kwargs for e in load_launch_file(name).args[0]
                if type(e).__name__ == 'DeclareLaunchArgument'}
    assert list(declared) == [a.name for a in graph.args]
    for arg in graph.args:
        assert declared[arg.name]['default_value'] == arg.default
        assert declared[arg.name]['description']


def test_franka_launch_file_has_the_arguments_of_the_design(
        fake_launch: dict[str, type]) -> None:
    declared = {e.args[0] for e in load_launch_file('franka').args[0]
                if type(e).__name__ == 'DeclareLaunchArgument'}
    assert {'robot_ip', 'robot_type', 'arm_prefix', 'namespace', 'load_gripper',
            'use_fake_hardware', 'checkpoint', 'instruction', 'record', 'rviz'} <= declared


def test_franka_launch_includes_franka_bringup_with_the_robot_arguments(
        fake_launch: dict[str, type]) -> None:
    args = dict(graph_mod.resolve(graph_mod.load_graph('franka'),
                                  {'robot_ip': '10.0.0.2', 'use_fake_hardware': 'true'}).values)
    includes = [e for e in load_launch_file('franka').args[0]
                if type(e).__name__ == 'IncludeLaunchDescription']
    assert len(includes) == 1
    source = includes[0].args[0]
    assert evaluate(source.args[0], args) == '<share of franka_bringup>/launch/franka.launch.py'
    passed = {k: evaluate(v, args) for k, v in includes[0].kwargs['launch_arguments']}
    assert passed['robot_ip'] == '10.0.0.2' and passed['use_fake_hardware'] == 'true'
    assert passed['load_gripper'] == 'true' and passed['robot_type'] == 'fr3'


def test_lifecycle_nodes_are_configured_on_start_and_activated_from_inactive(
        fake_launch: dict[str, type]) -> None:
    from lifecycle_msgs.msg import Transition

    entities = load_launch_file('sim').args[0]
    policy = next(e for e in entities if type(e).__name__ == 'LifecycleNode')
    handlers = [e.args[0] for e in entities if type(e).__name__ == 'RegisterEventHandler']
    on_start = [h for h in handlers if type(h).__name__ == 'OnProcessStart'
                and h.kwargs['target_action'] is policy]
    on_inactive = [h for h in handlers if type(h).__name__ == 'OnStateTransition'
                   and h.kwargs['target_lifecycle_node'] is policy]
    assert len(on_start) == 1 and len(on_inactive) == 1
    configure = on_start[0].kwargs['on_start'][0].kwargs['event']
    activate = on_inactive[0].kwargs['entities'][0].kwargs['event']
    assert configure.kwargs['transition_id'] == Transition.TRANSITION_CONFIGURE
    assert activate.kwargs['transition_id'] == Transition.TRANSITION_ACTIVATE
    assert on_inactive[0].kwargs['goal_state'] == 'inactive'


def test_servo_gets_the_fr3_urdf_srdf_and_moveit_parameters_at_launch_time(
        fake_launch: dict[str, type]) -> None:
    args = dict(graph_mod.resolve(graph_mod.load_graph('franka'),
                                  {'robot_ip': '10.0.0.2'}).values)
    servo = launched_nodes(load_launch_file('franka'), args)['/servo_node']
    params = servo['params']
    urdf = params['robot_description']
    assert urdf.startswith('$(xacro ') and 'franka_arm.urdf.xacro' in urdf
    assert 'robot_ip:=10.0.0.2' in urdf and 'hand:=true' in urdf
    assert 'robots/fr3/fr3.srdf.xacro' in params['robot_description_semantic']
    assert 'fr3_arm' in params['robot_description_kinematics']
    limits = params['robot_description_planning']['joint_limits']
    assert sorted(limits) == [f'fr3_joint{i}' for i in range(1, 8)]
    assert servo['params_files'][0].name == 'servo.yaml'


def test_launch_builder_imports_without_launch_installed() -> None:
    assert launch_builder.generate_from_graph   # the launch API is imported inside functions


def test_real_launch_files_load_where_launch_ros_is_installed() -> None:
    pytest.importorskip('launch_ros', reason='launch_ros is not installed here (it is in the '
                        'Docker image: docker/README.md)')
    from launch_ros.actions import Node

    from launch import LaunchDescription

    for name in GRAPHS:
        description = load_launch_file(name)
        assert isinstance(description, LaunchDescription)
        nodes = [e for e in description.entities if isinstance(e, Node)]
        assert len(nodes) == len(graph_mod.load_graph(name).nodes)


def test_real_launch_service_runs_a_graph_as_the_runner_does(
        ament_prefix: Path, tmp_path: Path) -> None:
    """ros2 launch semantics end to end: typed parameters, remaps, lifecycle autostart, and the
    exit of a required node shutting the launch down."""
    pytest.importorskip('launch_ros', reason='launch_ros is not installed here (it is in the '
                        'Docker image: docker/README.md)')
    from launch.actions import IncludeLaunchDescription

    from launch import LaunchDescription, LaunchDescriptionSource, LaunchService

    managed, plain, ender = (tmp_path / f'{n}.json' for n in ('managed', 'plain', 'ender'))
    path = tmp_path / 'g.yaml'
    path.write_text(yaml.safe_dump({
        'args': {'words': {'default': ''}, 'flag': {'default': True, 'type': 'bool'}},
        'nodes': [
            {'name': 'managed', 'package': TEST_PACKAGE, 'executable': 'dummy_node',
             'lifecycle': True, 'arguments': ['--lifecycle'],
             'params': {'report': str(managed)}},
            {'name': 'plain', 'package': TEST_PACKAGE, 'executable': 'dummy_node',
             'namespace': 'team', 'remaps': {'chatter': '/remapped/chatter'},
             'params': {'report': str(plain), 'label': '$(arg words)', 'flag': '$(arg flag)',
                        'values': [1.5, 2.5]}},
            {'name': 'ender', 'package': TEST_PACKAGE, 'executable': 'dummy_node',
             'params': {'report': str(ender), 'exit_after': 6.0}},
        ]}))
    service = LaunchService()
    service.include_launch_description(LaunchDescription([IncludeLaunchDescription(
        LaunchDescriptionSource(launch_builder.generate_from_graph(path)),
        launch_arguments=[('flag', 'false')])]))   # as `ros2 launch ... flag:=false`
    assert service.run() == 0
    m, p = read_report(managed), read_report(plain)
    assert m['events'][:3] == ['started', 'configure', 'activate']
    assert (p['namespace'], p['chatter']) == ('/team', '/remapped/chatter')
    assert p['params']['label'] == '' and p['params']['flag'] is False
    assert p['params']['values'] == [1.5, 2.5]
    assert read_report(ender)['events'][-1] == 'exit 0'
