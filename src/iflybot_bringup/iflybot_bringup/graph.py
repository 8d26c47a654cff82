"""Node graphs: the YAML that drives both `ros2 launch` (launch_builder) and `iflybot up` (runner).

A graph is data: launch arguments, nodes and (launch-only) includes of other launch files. Values
may hold two substitutions, with the launch XML spelling: `$(arg NAME)` and `$(find-pkg-share
PKG)`. `load_graph` validates the schema and names the bad key; `resolve` turns a graph and
`key:=value` overrides into concrete nodes for the runner, with the semantics `ros2 launch` gives
the same YAML (conditions, typed parameters).
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iflybot_vla_policy.params import flatten_params

PACKAGE = 'iflybot_bringup'
ARG_TYPES = ('str', 'bool', 'int', 'float')
_SUBST = re.compile(r'\$\((arg|find-pkg-share) +([A-Za-z0-9_]+) *\)')
_ANY_SUBST = re.compile(r'\$\(')
_NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')

GRAPH_KEYS = ('description', 'args', 'nodes', 'includes')
ARG_KEYS = ('default', 'description', 'type', 'choices')
NODE_KEYS = ('name', 'package', 'executable', 'namespace', 'params_files', 'params', 'remaps',
             'arguments', 'lifecycle', 'autostart', 'required', 'if', 'unless', 'requires',
             'robot_description', 'moveit', 'description')
INCLUDE_KEYS = ('package', 'file', 'args', 'if', 'unless', 'description')


class GraphError(ValueError):
    """A graph file, or an override of its arguments, is invalid; the message names the key."""


@dataclass(frozen=True)
class ArgSpec:
    name: str
    default: str
    description: str
    type: str = 'str'                      # one of ARG_TYPES: how parameters built from it parse
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Condition:
    """Start the entity only if the boolean launch argument `arg` is true (or false: negate)."""

    arg: str
    negate: bool = False


@dataclass(frozen=True)
class NodeSpec:
    name: str
    package: str
    executable: str
    namespace: str = ''
    params_files: tuple[str, ...] = ()     # relative to the iflybot_bringup package, or absolute
    params: Mapping[str, Any] = field(default_factory=dict)
    remaps: tuple[tuple[str, str], ...] = ()
    arguments: tuple[str, ...] = ()        # argv before --ros-args
    lifecycle: bool = False
    autostart: bool = True                 # lifecycle nodes: configure + activate after start
    required: bool = True                  # its exit ends the whole graph
    condition: Condition | None = None
    requires: tuple[str, ...] = ()         # ROS packages it needs at run time besides `package`
    robot_description: Mapping[str, str] | None = None  # FR3 xacro mappings (launch-time URDF)
    moveit: bool = False                   # add the FR3 MoveIt parameters (SRDF, kinematics, ...)
    description: str = ''


@dataclass(frozen=True)
class IncludeSpec:
    """Another package's launch file: only `ros2 launch` can start it (not the runner)."""

    package: str
    file: str
    args: Mapping[str, str] = field(default_factory=dict)
    condition: Condition | None = None
    description: str = ''


@dataclass(frozen=True)
class Graph:
    name: str
    description: str
    args: tuple[ArgSpec, ...]
    nodes: tuple[NodeSpec, ...]
    includes: tuple[IncludeSpec, ...]
    source: Path

    def arg(self, name: str) -> ArgSpec:
        for spec in self.args:
            if spec.name == name:
                return spec
        raise GraphError(f'{self.source}: no launch argument {name!r}')


@dataclass(frozen=True)
class ResolvedNode:
    """A node with every substitution done: what the runner starts."""

    spec: NodeSpec
    name: str
    namespace: str                         # '' or '/a/b'
    params_files: tuple[Path, ...]
    params: Mapping[str, Any]              # flat: 'a.b' -> value
    remaps: tuple[tuple[str, str], ...]
    arguments: tuple[str, ...]

    @property
    def fqn(self) -> str:
        """Fully qualified node name, e.g. /iflybot_policy or /ns/iflybot_policy."""
        return f'{self.namespace}/{self.name}' if self.namespace else f'/{self.name}'


@dataclass(frozen=True)
class ResolvedGraph:
    graph: Graph
    values: Mapping[str, str]              # every launch argument's value
    nodes: tuple[ResolvedNode, ...]        # those whose condition holds
    includes: tuple[IncludeSpec, ...]      # those whose condition holds


# ----------------------------------------------------------------------------------- locations

def bringup_dir() -> Path:
    """The iflybot_bringup package directory (graphs/, config/, rviz/, launch/).

    The source checkout when running from it (symlink install), else the installed share/.
    """
    override = os.environ.get('IFLYBOT_BRINGUP_DIR')
    if override:
        return Path(override)
    source = Path(__file__).resolve().parent.parent
    if (source / 'graphs').is_dir():
        return source
    share = package_share(PACKAGE)
    if share is None:
        raise FileNotFoundError(
            f'cannot find the {PACKAGE} package: source env.sh (or the ROS setup.bash)')
    return share


def package_share(package: str) -> Path | None:
    """share/<package> of an installed ROS package (ament index), or None."""
    for prefix in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep):
        if prefix and (Path(prefix) / 'share/ament_index/resource_index/packages' /
                       package).is_file():
            return Path(prefix) / 'share' / package
    return None


def package_prefix(package: str) -> Path | None:
    share = package_share(package)
    return share.parent.parent if share is not None else None


def graph_names() -> list[str]:
    return sorted(p.stem for p in (bringup_dir() / 'graphs').glob('*.yaml'))


def graph_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A graph by name (graphs/<name>.yaml) or by path to a YAML file."""
    text = os.fspath(name_or_path)
    if text.endswith(('.yaml', '.yml')) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise GraphError(f'no graph file {path}')
        return path
    path = bringup_dir() / 'graphs' / f'{text}.yaml'
    if not path.is_file():
        raise GraphError(f'unknown graph {text!r} (choose from: {", ".join(graph_names())})')
    return path


# ----------------------------------------------------------------------------------- loading

def load_graph(name_or_path: str | os.PathLike[str]) -> Graph:
    """Load and validate a graph; raises GraphError naming the file and the bad key."""
    path = graph_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise GraphError(f'{path}: invalid YAML: {exc}') from None
    return parse_graph(data, path)


def parse_graph(data: Any, path: Path) -> Graph:
    where = str(path)
    data = _mapping(data, where)
    _check_keys(data, GRAPH_KEYS, where)
    args = tuple(_parse_arg(name, spec, f'{where}: args.{name}')
                 for name, spec in _mapping(data.get('args') or {}, f'{where}: args').items())
    nodes_raw = data.get('nodes') or []
    if not isinstance(nodes_raw, list):
        raise GraphError(f'{where}: nodes: expected a list of nodes')
    nodes = tuple(_parse_node(raw, f'{where}: nodes[{i}]') for i, raw in enumerate(nodes_raw))
    includes_raw = data.get('includes') or []
    if not isinstance(includes_raw, list):
        raise GraphError(f'{where}: includes: expected a list')
    includes = tuple(_parse_include(raw, f'{where}: includes[{i}]')
                     for i, raw in enumerate(includes_raw))
    graph = Graph(name=path.stem, description=str(data.get('description', '')), args=args,
                  nodes=nodes, includes=includes, source=path)
    _check_references(graph)
    return graph


def _parse_arg(name: Any, spec: Any, where: str) -> ArgSpec:
    if not isinstance(name, str) or not _NAME.match(name):
        raise GraphError(f'{where}: argument names are identifiers, got {name!r}')
    spec = _mapping(spec, where)
    _check_keys(spec, ARG_KEYS, where)
    if 'default' not in spec:
        raise GraphError(f"{where}: missing key 'default' (every argument has a default)")
    kind = spec.get('type', 'str')
    if kind not in ARG_TYPES:
        raise GraphError(f'{where}.type: {kind!r} is not one of {", ".join(ARG_TYPES)}')
    choices = spec.get('choices')
    if choices is not None:
        if not isinstance(choices, list) or not choices:
            raise GraphError(f'{where}.choices: expected a non-empty list')
        choices = tuple(_launch_str(c) for c in choices)
    default = _launch_str(spec['default'])
    arg = ArgSpec(name=name, default=default, description=str(spec.get('description', '')),
                  type=kind, choices=choices)
    _typed_value(arg, default, f'{where}.default')
    return arg


def _parse_node(raw: Any, where: str) -> NodeSpec:
    raw = _mapping(raw, where)
    _check_keys(raw, NODE_KEYS, where)
    for key in ('name', 'package', 'executable'):
        if key not in raw:
            raise GraphError(f'{where}: missing key {key!r}')
        if not isinstance(raw[key], str) or not raw[key]:
            raise GraphError(f'{where}.{key}: expected a non-empty string')
    where = f'{where} ({raw["name"]})'
    params = _mapping(raw.get('params') or {}, f'{where}.params')
    for key in params:
        if not isinstance(key, str):
            raise GraphError(f'{where}.params: parameter names are strings, got {key!r}')
    remaps = _mapping(raw.get('remaps') or {}, f'{where}.remaps')
    description = raw.get('robot_description')
    if description is not None:
        description = {str(k): _launch_str(v) for k, v in
                       _mapping(description, f'{where}.robot_description').items()}
    moveit = _bool(raw.get('moveit', False), f'{where}.moveit')
    if moveit and description is None:
        raise GraphError(f'{where}.moveit: MoveIt parameters need robot_description '
                         f'(its xacro mappings)')
    lifecycle = _bool(raw.get('lifecycle', False), f'{where}.lifecycle')
    if 'autostart' in raw and not lifecycle:
        raise GraphError(f'{where}.autostart: only lifecycle nodes have autostart '
                         f'(set lifecycle: true)')
    return NodeSpec(
        name=raw['name'], package=raw['package'], executable=raw['executable'],
        namespace=str(raw.get('namespace', '') or ''),
        params_files=_str_list(raw.get('params_files'), f'{where}.params_files'),
        params=params,
        remaps=tuple((str(k), _launch_str(v)) for k, v in remaps.items()),
        arguments=tuple(_launch_str(a) for a in _list(raw.get('arguments'),
                                                      f'{where}.arguments')),
        lifecycle=lifecycle,
        autostart=_bool(raw.get('autostart', True), f'{where}.autostart'),
        required=_bool(raw.get('required', True), f'{where}.required'),
        condition=_parse_condition(raw, where),
        requires=_str_list(raw.get('requires'), f'{where}.requires'),
        robot_description=description, moveit=moveit,
        description=str(raw.get('description', '')))


def _parse_include(raw: Any, where: str) -> IncludeSpec:
    raw = _mapping(raw, where)
    _check_keys(raw, INCLUDE_KEYS, where)
    for key in ('package', 'file'):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise GraphError(f'{where}: missing key {key!r} (a non-empty string)')
    args = _mapping(raw.get('args') or {}, f'{where}.args')
    return IncludeSpec(package=raw['package'], file=raw['file'],
                       args={str(k): _launch_str(v) for k, v in args.items()},
                       condition=_parse_condition(raw, where),
                       description=str(raw.get('description', '')))


def _parse_condition(raw: Mapping[str, Any], where: str) -> Condition | None:
    if 'if' in raw and 'unless' in raw:
        raise GraphError(f"{where}: give either 'if' or 'unless', not both")
    for key, negate in (('if', False), ('unless', True)):
        if key in raw:
            arg = raw[key]
            if not isinstance(arg, str) or not _NAME.match(arg):
                raise GraphError(f'{where}.{key}: expected the name of a boolean argument')
            return Condition(arg=arg, negate=negate)
    return None


def _check_references(graph: Graph) -> None:
    """Every $(arg x) and condition names a declared argument; node names are unique."""
    declared = {a.name: a for a in graph.args}
    where = str(graph.source)

    def check_text(text: str, at: str) -> None:
        for kind, name in _tokens_names(text, at):
            if kind == 'arg' and name not in declared:
                raise GraphError(f'{at}: unknown argument {name!r} in $(arg {name})'
                                 f'{_did_you_mean(name, declared)}')

    def check_condition(cond: Condition | None, at: str) -> None:
        if cond is None:
            return
        if cond.arg not in declared:
            raise GraphError(f'{at}: condition on unknown argument {cond.arg!r}'
                             f'{_did_you_mean(cond.arg, declared)}')
        if declared[cond.arg].type != 'bool':
            raise GraphError(f'{at}: condition argument {cond.arg!r} must have type: bool')

    seen: set[tuple[str, str]] = set()
    for i, node in enumerate(graph.nodes):
        at = f'{where}: nodes[{i}] ({node.name})'
        key = (node.namespace, node.name)
        if key in seen:
            raise GraphError(f'{at}.name: duplicate node name {node.name!r}')
        seen.add(key)
        check_condition(node.condition, at)
        check_text(node.namespace, f'{at}.namespace')
        for text in node.params_files:
            check_text(text, f'{at}.params_files')
        for key_, value in flatten_params(node.params).items():
            if isinstance(value, str):
                check_text(value, f'{at}.params.{key_}')
        for src, dst in node.remaps:
            check_text(src, f'{at}.remaps')
            check_text(dst, f'{at}.remaps.{src}')
        for text in node.arguments:
            check_text(text, f'{at}.arguments')
        for key_, value in (node.robot_description or {}).items():
            check_text(value, f'{at}.robot_description.{key_}')
    for i, inc in enumerate(graph.includes):
        at = f'{where}: includes[{i}] ({inc.package})'
        check_condition(inc.condition, at)
        for key_, value in inc.args.items():
            check_text(value, f'{at}.args.{key_}')


# ----------------------------------------------------------------------------------- substitutions

def tokens(text: str) -> list[tuple[str, str]]:
    """Split a value into ('text', s), ('arg', name) and ('find-pkg-share', pkg) pieces."""
    return list(_tokens(text, text))


def _tokens(text: str, at: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    for match in _SUBST.finditer(text):
        if match.start() > pos:
            out.append(('text', text[pos:match.start()]))
        out.append((match.group(1), match.group(2)))
        pos = match.end()
    if pos < len(text):
        out.append(('text', text[pos:]))
    for kind, piece in out:
        if kind == 'text' and _ANY_SUBST.search(piece):
            raise GraphError(f'{at}: unsupported substitution in {text!r} (use $(arg NAME) or '
                             f'$(find-pkg-share PACKAGE))')
    return out


def _tokens_names(text: str, at: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in _tokens(text, at) if k != 'text']


def substitute(text: str, values: Mapping[str, str], at: str = '') -> str:
    """Perform the substitutions of a value with concrete argument values."""
    parts = []
    for kind, value in _tokens(text, at or text):
        if kind == 'text':
            parts.append(value)
        elif kind == 'arg':
            parts.append(values[value])
        else:
            share = package_share(value)
            if share is None:
                raise GraphError(f'{at or text}: package {value!r} is not installed '
                                 f'($(find-pkg-share {value}))')
            parts.append(str(share))
    return ''.join(parts)


def exact_arg(value: Any) -> str | None:
    """The argument name if `value` is exactly '$(arg NAME)', else None."""
    if isinstance(value, str):
        match = _SUBST.fullmatch(value.strip())
        if match and match.group(1) == 'arg':
            return match.group(2)
    return None


# ----------------------------------------------------------------------------------- resolving

def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """['key:=value', ...] -> {key: value}; the ros2 launch syntax."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition(':=')
        if not sep or not key:
            raise GraphError(f'argument {item!r}: expected key:=value')
        out[key] = value
    return out


def argument_values(graph: Graph, overrides: Mapping[str, str]) -> dict[str, str]:
    declared = {a.name: a for a in graph.args}
    for key in overrides:
        if key not in declared:
            raise GraphError(f'graph {graph.name!r} has no argument {key!r}'
                             f'{_did_you_mean(key, declared)}; its arguments: '
                             f'{", ".join(declared) or "(none)"}')
    values = {a.name: overrides.get(a.name, a.default) for a in graph.args}
    for arg in graph.args:
        _typed_value(arg, values[arg.name], f'argument {arg.name}')
    return values


def condition_holds(cond: Condition | None, values: Mapping[str, str]) -> bool:
    if cond is None:
        return True
    return parse_bool(values[cond.arg], f'argument {cond.arg}') != cond.negate


def resolve(graph: Graph, overrides: Mapping[str, str] | None = None) -> ResolvedGraph:
    """Concrete nodes for the given argument overrides, as `ros2 launch` would start them."""
    values = argument_values(graph, overrides or {})
    declared = {a.name: a for a in graph.args}
    nodes = []
    for node in graph.nodes:
        if not condition_holds(node.condition, values):
            continue
        at = f'node {node.name}'
        params = {}
        for key, value in flatten_params(node.params).items():
            params[key] = _param_value(value, values, declared, f'{at}: params.{key}')
        namespace = substitute(node.namespace, values, f'{at}: namespace').strip('/')
        nodes.append(ResolvedNode(
            spec=node, name=node.name, namespace=f'/{namespace}' if namespace else '',
            params_files=tuple(_params_file(substitute(f, values, f'{at}: params_files'))
                               for f in node.params_files),
            params=params,
            remaps=tuple((substitute(s, values, f'{at}: remaps'),
                          substitute(d, values, f'{at}: remaps')) for s, d in node.remaps),
            arguments=tuple(substitute(a, values, f'{at}: arguments') for a in node.arguments)))
    includes = tuple(i for i in graph.includes if condition_holds(i.condition, values))
    return ResolvedGraph(graph=graph, values=values, nodes=tuple(nodes), includes=includes)


def _params_file(text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else bringup_dir() / path


def _param_value(value: Any, values: Mapping[str, str], declared: Mapping[str, ArgSpec],
                 at: str) -> Any:
    """A parameter value: '$(arg x)' takes x's type; other strings stay strings."""
    if isinstance(value, list):
        return [_param_value(v, values, declared, at) for v in value]
    if not isinstance(value, str):
        return value
    name = exact_arg(value)
    if name is not None:
        return _typed_value(declared[name], values[name], at)
    return substitute(value, values, at)


def _typed_value(arg: ArgSpec, text: str, at: str) -> Any:
    if arg.choices is not None and text not in arg.choices:
        raise GraphError(f'{at}: {text!r} is not one of {", ".join(arg.choices)}')
    if arg.type == 'str':
        return text
    if arg.type == 'bool':
        return parse_bool(text, at)
    try:
        return int(text) if arg.type == 'int' else float(text)
    except ValueError:
        raise GraphError(f'{at}: {text!r} is not a valid {arg.type}') from None


def parse_bool(text: str, at: str) -> bool:
    """Launch's boolean strings: true/false/1/0, any case."""
    low = text.strip().lower()
    if low in ('true', '1'):
        return True
    if low in ('false', '0'):
        return False
    raise GraphError(f'{at}: {text!r} is not a boolean (true, false, 1 or 0)')


# ----------------------------------------------------------------------------------- helpers

def _mapping(value: Any, where: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise GraphError(f'{where}: expected a mapping, got {type(value).__name__}')
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise GraphError(f'{where}: expected a list')
    return value


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    items = _list(value, where)
    for item in items:
        if not isinstance(item, str) or not item:
            raise GraphError(f'{where}: expected a list of non-empty strings, got {item!r}')
    return tuple(items)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise GraphError(f'{where}: expected true or false, got {value!r}')
    return value


def _launch_str(value: Any) -> str:
    """Launch arguments are strings; YAML booleans become 'true'/'false' as launch writes them."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if value is None:
        return ''
    return str(value)


def _check_keys(data: Mapping[Any, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise GraphError(f'{where}: unknown key {key!r}{_did_you_mean(str(key), allowed)}'
                             f' (allowed: {", ".join(allowed)})')


def _did_you_mean(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f' (did you mean {close[0]!r}?)' if close else ''
