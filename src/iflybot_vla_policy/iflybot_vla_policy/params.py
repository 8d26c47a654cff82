"""One parameter schema per node: every parameter declared once, with its type, default,
description and allowed values (the idea of generate_parameter_library, as plain Python).

From a `Schema` a node declares its parameters (ros/parameters.py adds the ROS descriptors),
validates the values it was given (`ParameterError` names the parameter, the value and what is
allowed), warns about keys it does not know (with the closest known name, so a typo in a params
file is not silently ignored), and a ROS 2 params file is checked before anything starts
(`check_params_file`). No rclpy here: the schemas and the file checks run anywhere.
"""
from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCALAR_KINDS = ('bool', 'int', 'float', 'str')
KINDS = SCALAR_KINDS + tuple(f'{k}_list' for k in SCALAR_KINDS)
# Parameters rclpy declares on every node (and QoS overrides): never unknown.
ROS_PARAMETERS = frozenset({'use_sim_time', 'start_type_description_service'})
ROS_PREFIXES = ('qos_overrides.',)


class ParameterError(ValueError):
    """A bad parameter value; `name` is the parameter."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f'parameter {name}: {reason}')
        self.name = name
        self.reason = reason


def _kind_of(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        if not value:
            raise TypeError('an empty list default needs an explicit kind')
        return f'{_kind_of(value[0])}_list'
    for kind, cls in (('bool', bool), ('int', int), ('float', float), ('str', str)):
        if isinstance(value, cls):
            return kind
    raise TypeError(f'no parameter kind for a default of type {type(value).__name__}')


def _coerce(kind: str, value: Any) -> Any:
    """`value` as `kind`, or ValueError. Lenient where ROS is not and no meaning is lost: an
    integer for a float parameter (`camera_rate:=15`), 'true'/'false' for a bool."""
    if kind.endswith('_list'):
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return tuple(_coerce(kind[:-5], v) for v in value)
    if kind == 'bool':
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ('true', 'false'):
            return value.lower() == 'true'
        raise ValueError
    if isinstance(value, bool):
        raise ValueError
    if kind == 'int':
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if kind == 'float':
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError
        return float(value)
    if not isinstance(value, str):
        raise ValueError
    return value


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Param:
    """One parameter. `kind` (bool, int, float, str or <kind>_list) follows from the default
    unless given. `choices`, the bounds (ge >=, gt >, le <=, lt <) and `check` (raises
    ValueError with the reason) apply to the value, or to every item of a list."""

    name: str
    default: Any
    description: str
    kind: str = ''
    choices: tuple[Any, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    check: Callable[[Any], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, 'kind', _kind_of(self.default))
        if self.kind not in KINDS:
            raise TypeError(f'parameter {self.name}: kind {self.kind!r} is not one of {KINDS}')
        if isinstance(self.default, list):
            object.__setattr__(self, 'default', tuple(self.default))
        object.__setattr__(self, 'choices', tuple(self.choices))
        bounded = any(b is not None for b in (self.ge, self.gt, self.le, self.lt))
        if bounded and self.item_kind not in ('int', 'float'):
            raise TypeError(f'parameter {self.name}: bounds on a {self.kind} parameter')
        if not self.description:
            raise TypeError(f'parameter {self.name}: no description')
        self.parse(self.default)   # a schema whose default is invalid is a bug: fail at import

    @property
    def item_kind(self) -> str:
        return self.kind.removesuffix('_list')

    @property
    def is_list(self) -> bool:
        return self.kind.endswith('_list')

    def constraint(self) -> str:
        """What is allowed, in words ('' when any value of the kind is)."""
        parts = []
        if self.choices:
            parts.append('one of ' + ', '.join(str(c) for c in self.choices))
        low = f'>= {_number(self.ge)}' if self.ge is not None else (
            f'> {_number(self.gt)}' if self.gt is not None else '')
        high = f'<= {_number(self.le)}' if self.le is not None else (
            f'< {_number(self.lt)}' if self.lt is not None else '')
        if self.ge is not None and self.le is not None:
            parts.append(f'in [{_number(self.ge)}, {_number(self.le)}]')
        elif low or high:
            parts.append(' and '.join(p for p in (low, high) if p))
        text = '; '.join(parts)
        return f'each {text}' if text and self.is_list else text

    def parse(self, value: Any) -> Any:
        """The typed value (tuples for lists), or ParameterError naming this parameter."""
        try:
            typed = _coerce(self.kind, value)
        except ValueError:
            raise ParameterError(self.name, f'expected {self.kind}, got {value!r}') from None
        for item in typed if self.is_list else (typed,):
            self._check_item(item)
        return typed

    def _check_item(self, item: Any) -> None:
        if self.choices and item not in self.choices:
            close = difflib.get_close_matches(str(item), [str(c) for c in self.choices], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise ParameterError(self.name, f'{item!r} is not one of '
                                            f'{list(self.choices)}{hint}')
        if ((self.ge is not None and not item >= self.ge)
                or (self.gt is not None and not item > self.gt)
                or (self.le is not None and not item <= self.le)
                or (self.lt is not None and not item < self.lt)):
            raise ParameterError(self.name, f'{item!r} is out of range: must be '
                                            f'{self.constraint().removeprefix("each ")}')
        if self.check is not None:
            try:
                self.check(item)
            except ValueError as err:
                raise ParameterError(self.name, str(err)) from None


def is_ros_parameter(name: str) -> bool:
    """Parameters that rclpy itself declares (use_sim_time, QoS overrides)."""
    return name in ROS_PARAMETERS or name.startswith(ROS_PREFIXES)


@dataclass(frozen=True)
class Schema:
    """The parameters of one node, in declaration order. `checks` are rules across parameters:
    each gets the typed values and raises ParameterError naming the parameter to change.
    `read_only`: the node reads its parameters once at start, so a later set is refused
    instead of silently having no effect."""

    node: str
    params: tuple[Param, ...]
    checks: tuple[Callable[[Mapping[str, Any]], None], ...] = field(default=(), compare=False)
    read_only: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, 'params', tuple(self.params))
        names = [p.name for p in self.params]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise TypeError(f'schema {self.node}: parameters declared twice: {duplicates}')
        object.__setattr__(self, '_by_name', {p.name: p for p in self.params})

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Param:
        return self._by_name[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Typed values of every parameter (the default where `values` has none); the first
        bad one raises ParameterError. Keys of no parameter are ignored here: see unknown()."""
        out = {p.name: p.parse(values[p.name]) if p.name in values else p.default
               for p in self.params}
        for rule in self.checks:
            rule(out)
        return out

    def errors(self, values: Mapping[str, Any]) -> list[str]:
        """Every problem with `values`: unknown keys, then each bad value (not only the
        first), then the rules across parameters when every value is good."""
        problems = self.unknown(values)
        bad = []
        for p in self.params:
            if p.name in values:
                try:
                    p.parse(values[p.name])
                except ParameterError as err:
                    bad.append(str(err))
        if not bad:
            try:
                self.validate(values)
            except ParameterError as err:
                bad.append(str(err))
        return problems + bad

    def closest(self, name: str) -> str | None:
        close = difflib.get_close_matches(name, self.names, n=1)
        return close[0] if close else None

    def unknown(self, names: Iterable[str]) -> list[str]:
        """A warning for each name that is no parameter of the node (a typo in a params file
        would otherwise be ignored and the default used), with the closest known name."""
        problems = []
        for name in sorted(set(names)):
            if name in self or is_ros_parameter(name):
                continue
            close = self.closest(name)
            hint = f"; did you mean '{close}'?" if close else ''
            problems.append(f"unknown parameter '{name}' ignored{hint}")
        return problems

    def markdown(self) -> str:
        """The schema as a Markdown table (docs/parameters.md)."""
        lines = ['| parameter | type | default | allowed | description |',
                 '|---|---|---|---|---|']
        for p in self.params:
            default = yaml.safe_dump(list(p.default) if p.is_list else p.default,   # as in
                                     default_flow_style=True, width=1000)          # YAML
            default = default.strip().removesuffix('\n...')
            cells = [f'`{p.name}`', p.kind, f'`{default}`', p.constraint(), p.description]
            lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
        return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------ params files
def flatten_params(values: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """Nested mappings become dotted names, as ROS reads them (`a: {b: 1}` is `a.b`)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f'{prefix}{key}'
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f'{name}.'))
        else:
            out[name] = value
    return out


def _section_pattern(key: str) -> re.Pattern[str]:
    """A params-file section key ('iflybot_sim', '/ns/node', '/**', '/**/node', '/*/node') as
    a regex over fully qualified node names: '**' matches any namespaces, '*' one name."""
    tokens = [t for t in key.strip('/').split('/') if t]
    regex = ''
    for token in tokens:
        if token == '**':
            regex += '(/[^/]+)*'
        else:
            regex += '/' + '[^/]*'.join(re.escape(part) for part in token.split('*'))
    return re.compile(regex or '/')


def load_params_file(path: str | Path) -> dict[str, Any]:
    """A ROS 2 params file as {section key: {dotted name: value}}; ValueError naming the file
    when it is not one (`node: {ros__parameters: {...}}` per section)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f'{path}: not YAML: {err}') from None
    if not isinstance(data, Mapping):
        raise ValueError(f'{path}: expected a mapping of node names to ros__parameters')
    sections = {}
    for key, body in data.items():
        if not isinstance(body, Mapping) or not isinstance(body.get('ros__parameters'), Mapping):
            raise ValueError(f"{path}: section '{key}' has no 'ros__parameters' mapping")
        if set(body) != {'ros__parameters'}:
            extra = sorted(set(body) - {'ros__parameters'})
            raise ValueError(f"{path}: section '{key}': unexpected keys {extra} beside "
                             "'ros__parameters'")
        sections[str(key)] = flatten_params(body['ros__parameters'])
    return sections


def node_values(sections: Mapping[str, Mapping[str, Any]], node: str) -> dict[str, Any]:
    """The values a node with the fully qualified name `node` ('/iflybot_sim' or a bare name,
    root namespace) takes from the sections, later sections overriding earlier ones."""
    fqn = node if node.startswith('/') else f'/{node}'
    values: dict[str, Any] = {}
    for key, body in sections.items():
        if _section_pattern(key).fullmatch(fqn):
            values.update(body)
    return values


def check_params_file(path: str | Path, schemas: Iterable[Schema]) -> list[str]:
    """Problems of a params file for the nodes of `schemas` (each in the root namespace under
    its schema's node name): unknown keys with the closest known one, bad values, and sections
    that apply to none of the nodes. An empty list means the file is good."""
    schemas = list(schemas)
    try:
        sections = load_params_file(path)
    except (OSError, ValueError) as err:
        return [str(err)]
    problems = []
    for key in sections:
        if not any(_section_pattern(key).fullmatch(f'/{s.node}') for s in schemas):
            known = [s.node for s in schemas]
            close = difflib.get_close_matches(key.strip('/'), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ''
            problems.append(f"{path}: section '{key}' applies to none of {known}{hint}")
    for schema in schemas:
        values = node_values(sections, schema.node)
        problems += [f'{path}: {schema.node}: {p}' for p in schema.errors(values)]
    return problems
