"""Node graphs: the shipped graphs load, and a bad graph fails on load naming the bad key."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from iflybot_bringup import graph as graph_mod
from iflybot_bringup.graph import GraphError

SHIPPED = ('franka', 'sim', 'gazebo', 'record', 'home')


def _graph(tmp_path: Path, data: dict[str, Any]) -> graph_mod.Graph:
    path = tmp_path / 'g.yaml'
    path.write_text(yaml.safe_dump(data))
    return graph_mod.load_graph(path)


def _node(**fields: Any) -> dict[str, Any]:
    return {'name': 'n', 'package': 'p', 'executable': 'e', **fields}


def test_every_shipped_graph_loads_and_resolves_with_its_defaults() -> None:
    assert set(SHIPPED) <= set(graph_mod.graph_names())
    for name in SHIPPED:
        resolved = graph_mod.resolve(graph_mod.load_graph(name))
        assert resolved.nodes, name


def test_every_file_of_this_package_a_graph_names_exists() -> None:
    own = re.compile(r'\$\(find-pkg-share iflybot_bringup\)/(\S+)')
    named = set()
    for name in SHIPPED:
        for node in graph_mod.load_graph(name).nodes:
            named.update(node.params_files)
            named.update(m.group(1) for a in node.arguments for m in own.finditer(a))
    assert {'config/servo.yaml', 'config/fr3_arm_controller.yaml',
            'rviz/iflybot.rviz'} <= named
    missing = sorted(f for f in named if not (graph_mod.bringup_dir() / f).is_file())
    assert missing == [], f'files named by graphs but missing: {missing}'


def test_sim_graph_starts_the_recorder_only_when_recording() -> None:
    graph = graph_mod.load_graph('sim')
    names = [n.name for n in graph_mod.resolve(graph).nodes]
    assert names == ['iflybot_sim', 'iflybot_policy']
    names = [n.name for n in graph_mod.resolve(graph, {'record': 'true'}).nodes]
    assert names == ['iflybot_sim', 'iflybot_policy', 'iflybot_recorder']
    policy = graph_mod.resolve(graph).nodes[1]
    assert policy.spec.lifecycle and policy.spec.autostart and policy.spec.required


def test_record_graph_uses_the_robot_or_the_simulator() -> None:
    graph = graph_mod.load_graph('record')
    sim = graph_mod.resolve(graph)
    assert [n.name for n in sim.nodes] == ['iflybot_sim', 'iflybot_expert_teleop',
                                           'iflybot_recorder']
    assert sim.includes == ()
    robot = graph_mod.resolve(graph, {'robot': 'true', 'expert': 'false'})
    assert 'iflybot_sim' not in [n.name for n in robot.nodes]
    assert [i.package for i in robot.includes] == ['franka_bringup']


def test_argument_substitution_keeps_the_argument_type(tmp_path: Path) -> None:
    graph = _graph(tmp_path, {
        'args': {'rate': {'default': '30', 'type': 'int'}, 'name': {'default': '7'},
                 'on': {'default': False, 'type': 'bool'}},
        'nodes': [_node(params={'rate': '$(arg rate)', 'name': '$(arg name)',
                                'on': '$(arg on)', 'topic': '/robot_$(arg name)/x',
                                'nested': {'deep': '$(arg rate)'}})]})
    params = graph_mod.resolve(graph, {'on': 'True'}).nodes[0].params
    assert params == {'rate': 30, 'name': '7', 'on': True, 'topic': '/robot_7/x',
                      'nested.deep': 30}


@pytest.mark.parametrize('data, message', [
    ({'nodes': [_node(remap={'a': 'b'})]},
     r"nodes\[0\]: unknown key 'remap' \(did you mean 'remaps'\?\)"),
    ({'nodez': []}, r"unknown key 'nodez' \(did you mean 'nodes'\?\)"),
    ({'nodes': [{'name': 'n', 'package': 'p'}]}, r"nodes\[0\]: missing key 'executable'"),
    ({'args': {'x': {'description': 'no default'}}}, r"args.x: missing key 'default'"),
    ({'args': {'x': {'default': 'a', 'type': 'string'}}}, r"args.x.type: 'string' is not one"),
    ({'args': {'x': {'default': 'maybe', 'type': 'bool'}}}, r"args.x.default: 'maybe' is not"),
    ({'nodes': [_node(params={'p': '$(arg nope)'})]},
     r"nodes\[0\] \(n\).params.p: unknown argument 'nope'"),
    ({'args': {'rviz': {'default': 'x'}}, 'nodes': [_node(**{'if': 'rviz'})]},
     r"condition argument 'rviz' must have type: bool"),
    ({'nodes': [_node(**{'if': 'missing'})]}, r"condition on unknown argument 'missing'"),
    ({'nodes': [_node(), _node()]}, r"nodes\[1\] \(n\).name: duplicate node name 'n'"),
    ({'nodes': [_node(autostart=True)]}, r'autostart: only lifecycle nodes have autostart'),
    ({'nodes': [_node(required='yes')]}, r"required: expected true or false, got 'yes'"),
    ({'nodes': [_node(params={'p': '$(env HOME)'})]}, r'unsupported substitution'),
    ({'nodes': [_node(moveit=True)]}, r'moveit: MoveIt parameters need robot_description'),
    ({'includes': [{'package': 'franka_bringup'}]}, r"includes\[0\]: missing key 'file'"),
])
def test_invalid_graph_fails_on_load_naming_the_bad_key(
        tmp_path: Path, data: dict[str, Any], message: str) -> None:
    with pytest.raises(GraphError, match=message):
        _graph(tmp_path, data)


def test_overrides_are_checked_against_the_declared_arguments(tmp_path: Path) -> None:
    graph = _graph(tmp_path, {'args': {'rviz': {'default': False, 'type': 'bool'},
                                       'mode': {'default': 'joint',
                                                'choices': ['joint', 'ee_delta']}}})
    with pytest.raises(GraphError, match=r"no argument 'rvis' \(did you mean 'rviz'\?\)"):
        graph_mod.resolve(graph, {'rvis': 'true'})
    with pytest.raises(GraphError, match=r"argument mode: 'cartesian' is not one of"):
        graph_mod.resolve(graph, {'mode': 'cartesian'})
    with pytest.raises(GraphError, match=r'expected key:=value'):
        graph_mod.parse_overrides(['rviz=true'])


def test_unknown_graph_name_lists_the_graphs() -> None:
    with pytest.raises(GraphError, match=r"unknown graph 'simm' \(choose from: .*sim"):
        graph_mod.load_graph('simm')
