"""Build a launch_ros LaunchDescription from a node graph (graphs/*.yaml).

Every launch file of this package is two lines that call `generate_from_graph(name)`. The
substitutions of the graph become launch substitutions, so `ros2 launch ... key:=value` works as
it does for hand-written launch files: `$(arg x)` -> LaunchConfiguration, `$(find-pkg-share p)`
-> FindPackageShare, `if:`/`unless:` -> IfCondition/UnlessCondition. Parameters taken exactly
from a `str` argument are typed as strings (launch would parse '' or '1' as YAML otherwise).
Lifecycle nodes with autostart get configure on process start and activate on reaching inactive.
launch and launch_ros are imported inside the functions: this module imports without them.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from iflybot_bringup import graph as graph_mod
from iflybot_bringup import moveit_params


def generate_from_graph(name_or_path: str | Path) -> Any:
    """The LaunchDescription of a graph (call it from generate_launch_description())."""
    from launch.actions import DeclareLaunchArgument

    from launch import LaunchDescription

    graph = graph_mod.load_graph(name_or_path)
    entities: list[Any] = []
    for arg in graph.args:
        kwargs: dict[str, Any] = {'default_value': arg.default, 'description': arg.description}
        if arg.choices is not None:
            kwargs['choices'] = list(arg.choices)
        entities.append(DeclareLaunchArgument(arg.name, **kwargs))
    for include in graph.includes:
        entities.append(_include(include))
    for node in graph.nodes:
        entities.extend(_node_actions(graph, node))
    return LaunchDescription(entities)


def substitutions(text: str) -> list[Any]:
    """A graph value -> a list of launch substitutions (plain strings for text)."""
    from launch.substitutions import LaunchConfiguration
    from launch_ros.substitutions import FindPackageShare

    out: list[Any] = []
    for kind, value in graph_mod.tokens(text):
        if kind == 'text':
            out.append(value)
        elif kind == 'arg':
            out.append(LaunchConfiguration(value))
        else:
            out.append(FindPackageShare(value))
    return out


def _condition(cond: graph_mod.Condition | None) -> Any:
    if cond is None:
        return None
    from launch.conditions import IfCondition, UnlessCondition
    from launch.substitutions import LaunchConfiguration

    kind = UnlessCondition if cond.negate else IfCondition
    return kind(LaunchConfiguration(cond.arg))


def _include(include: graph_mod.IncludeSpec) -> Any:
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from launch.substitutions import PathJoinSubstitution
    from launch_ros.substitutions import FindPackageShare

    source = PythonLaunchDescriptionSource(
        PathJoinSubstitution([FindPackageShare(include.package), include.file]))
    launch_arguments = [(key, substitutions(value)) for key, value in include.args.items()]
    return IncludeLaunchDescription(source, launch_arguments=launch_arguments,
                                    condition=_condition(include.condition))


def _params_file(text: str) -> Any:
    from launch_ros.parameter_descriptions import ParameterFile

    tokens = graph_mod.tokens(text)
    if len(tokens) == 1 and tokens[0][0] == 'text':
        path = Path(text)
        if not path.is_absolute():
            path = graph_mod.bringup_dir() / path
        return ParameterFile(str(path))
    return ParameterFile(substitutions(text))


def _param_value(value: Any, declared: Mapping[str, graph_mod.ArgSpec]) -> Any:
    from launch_ros.parameter_descriptions import ParameterValue

    if isinstance(value, list):
        return [_param_value(v, declared) for v in value]
    if not isinstance(value, str) or not graph_mod.tokens(value) or all(
            kind == 'text' for kind, _ in graph_mod.tokens(value)):
        return value
    name = graph_mod.exact_arg(value)
    if name is not None and declared[name].type != 'str':
        # bool/int/float arguments: launch parses the text as YAML, as the runner does
        return ParameterValue(substitutions(value))
    return ParameterValue(substitutions(value), value_type=str)


def robot_description_parameters(mappings: Mapping[str, str], moveit: bool) -> list[Any]:
    """robot_description (and the SRDF) from franka_description's xacro files, at launch time."""
    from launch.substitutions import Command, FindExecutable, PathJoinSubstitution
    from launch_ros.parameter_descriptions import ParameterValue
    from launch_ros.substitutions import FindPackageShare

    urdf = PathJoinSubstitution([FindPackageShare(moveit_params.URDF_XACRO[0]),
                                 moveit_params.URDF_XACRO[1]])
    command: list[Any] = [FindExecutable(name='xacro'), ' ', urdf]
    for key, value in mappings.items():
        command += [f' {key}:=', *substitutions(value)]
    params: list[Any] = [{'robot_description': ParameterValue(Command(command), value_type=str)}]
    if moveit:
        robot_type = substitutions(mappings.get('robot_type', 'fr3'))
        # robots/<type>/<type>.srdf.xacro, concatenated (PathJoinSubstitution takes no lists)
        srdf = [FindPackageShare(moveit_params.SRDF_XACRO_DIR[0]),
                f'/{moveit_params.SRDF_XACRO_DIR[1]}/', *robot_type, '/', *robot_type,
                '.srdf.xacro']
        semantic: list[Any] = [FindExecutable(name='xacro'), ' ', *srdf]
        if 'hand' in mappings:
            semantic += [' hand:=', *substitutions(mappings['hand'])]
        params.append({'robot_description_semantic':
                       ParameterValue(Command(semantic), value_type=str)})
        params.append(moveit_params.fr3_moveit_parameters())
    return params


def _not_shutting_down(context: Any) -> bool:
    return not context.is_shutdown


def _node_actions(graph: graph_mod.Graph, node: graph_mod.NodeSpec) -> list[Any]:
    from launch.actions import Shutdown
    from launch_ros.actions import LifecycleNode, Node

    from launch import Condition

    declared = {a.name: a for a in graph.args}
    parameters: list[Any] = [_params_file(f) for f in node.params_files]
    if node.robot_description is not None:
        parameters += robot_description_parameters(node.robot_description, node.moveit)
    if node.params:
        parameters.append({key: _param_value(value, declared)
                           for key, value in graph_mod.flatten_params(node.params).items()})
    kwargs: dict[str, Any] = dict(
        package=node.package, executable=node.executable, name=node.name,
        namespace=substitutions(node.namespace) if node.namespace else '',
        parameters=parameters,
        remappings=[(substitutions(src), substitutions(dst)) for src, dst in node.remaps],
        arguments=[substitutions(a) for a in node.arguments],
        output='screen', emulate_tty=True, condition=_condition(node.condition))
    if node.required:
        # Once shut down, further exits must not emit Shutdown again (launch_ros raises
        # 'Cannot shutdown a ROS adapter that is not running' on a second one).
        kwargs['on_exit'] = Shutdown(reason=f'required node {node.name} exited',
                                     condition=Condition(predicate=_not_shutting_down))
    if not node.lifecycle:
        return [Node(**kwargs)]
    action = LifecycleNode(**kwargs)
    return [action, *(_autostart(action) if node.autostart else [])]


def _autostart(action: Any) -> list[Any]:
    """configure when the process starts, activate when the node reaches inactive."""
    from launch.actions import EmitEvent, RegisterEventHandler
    from launch.event_handlers import OnProcessStart
    from launch.events import matches_action
    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState
    from lifecycle_msgs.msg import Transition

    configure = EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(action),
                                            transition_id=Transition.TRANSITION_CONFIGURE))
    activate = EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(action),
                                           transition_id=Transition.TRANSITION_ACTIVATE))
    return [
        RegisterEventHandler(OnProcessStart(target_action=action, on_start=[configure])),
        RegisterEventHandler(OnStateTransition(target_lifecycle_node=action,
                                               goal_state='inactive', entities=[activate])),
    ]
