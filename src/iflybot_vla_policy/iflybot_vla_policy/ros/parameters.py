"""A node's parameters from its `params.Schema`: declared once with ROS descriptors (type,
description, range, choices), validated, and unknown overrides named.

Overrides (a params file, `-p name:=value`, `parameter_overrides=`) are validated before they
are declared and declared as the schema's type, so `camera_rate:=15` is the float 15.0 rather
than rclpy's type error. An override that fails validation is declared as given, without
ranges, so that `read_parameters` names it and the node can fail however it fails: at start
(`load_parameters`, plain nodes) or on configure (lifecycle nodes call `declare_parameters` in
the constructor and `read_parameters` in on_configure).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rcl_interfaces.msg import ParameterType as Type
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from iflybot_vla_policy.params import Param, ParameterError, Schema

__all__ = ['declare_parameters', 'descriptor', 'load_parameters', 'read_parameters',
           'unknown_parameters', 'ParameterError']

ROS_TYPES = {'bool': Type.PARAMETER_BOOL, 'int': Type.PARAMETER_INTEGER,
             'float': Type.PARAMETER_DOUBLE, 'str': Type.PARAMETER_STRING,
             'bool_list': Type.PARAMETER_BOOL_ARRAY, 'int_list': Type.PARAMETER_INTEGER_ARRAY,
             'float_list': Type.PARAMETER_DOUBLE_ARRAY,
             'str_list': Type.PARAMETER_STRING_ARRAY}


def descriptor(param: Param, read_only: bool = True) -> ParameterDescriptor:
    """What `ros2 param describe` shows: description, type, what is allowed in words and, for
    numbers bounded on both sides, the range rclpy also enforces on a later set."""
    desc = ParameterDescriptor(description=param.description, type=ROS_TYPES[param.kind],
                               additional_constraints=param.constraint(), read_only=read_only)
    low = param.ge if param.ge is not None else param.gt
    high = param.le if param.le is not None else param.lt
    if low is None or high is None:
        return desc       # ROS ranges have two ends; a one-sided bound is in the words only
    if param.kind == 'int':
        desc.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=1)]
    elif param.kind == 'float':
        desc.floating_point_range = [FloatingPointRange(from_value=float(low),
                                                        to_value=float(high))]
    return desc


def _overrides(node: Node) -> dict[str, Any]:
    """Values given to the node (params files, -p, parameter_overrides=): rclpy keeps them
    for parameters not yet declared, whether or not they ever will be."""
    return {name: p.value for name, p in getattr(node, '_parameter_overrides', {}).items()}


def unknown_parameters(node: Node, schema: Schema) -> list[str]:
    """A warning per override that is no parameter of the node, with the closest known name."""
    return schema.unknown(n for n in _overrides(node) if not node.has_parameter(n))


def declare_parameters(node: Node, schema: Schema) -> None:
    """Declare every parameter of `schema` (see the module docstring for overrides). With
    `schema.read_only` false, a later set is checked against the schema as well."""
    overrides = _overrides(node)
    for param in schema:
        value: Any = param.default
        desc = descriptor(param, schema.read_only)
        if param.name in overrides:
            value = overrides[param.name]
            if value is None and param.is_list:
                value = ()     # `[]` in a params file: rcl's YAML parser gives it no type
            try:
                value = param.parse(value)
            except ParameterError:
                desc = ParameterDescriptor(description=param.description, dynamic_typing=True,
                                           additional_constraints=param.constraint(),
                                           read_only=schema.read_only)
        if isinstance(value, tuple):
            value = list(value)
        if value == [] and not desc.dynamic_typing:
            # An empty list has no type in ROS: declared by type, and read back as empty.
            node.declare_parameter(param.name, Parameter.Type(desc.type), desc,
                                   ignore_override=True)
        else:
            node.declare_parameter(param.name, value, desc, ignore_override=True)
    if not schema.read_only:   # after declaring: rclpy runs these callbacks on declare too
        node.add_on_set_parameters_callback(lambda params: _check_set(schema, params))


def _check_set(schema: Schema, params: list[Parameter]) -> SetParametersResult:
    """A later set (`ros2 param set`) is refused with the schema's reason, not only for the
    type and range that rclpy checks; rules across parameters wait for read_parameters."""
    for param in params:
        if param.name in schema:
            try:
                schema[param.name].parse(param.value)
            except ParameterError as err:
                return SetParametersResult(successful=False, reason=str(err))
    return SetParametersResult(successful=True)


def read_parameters(node: Node, schema: Schema, names: Iterable[str] | None = None
                    ) -> dict[str, Any]:
    """The node's current values of the schema's parameters, typed and validated
    (ParameterError naming the first bad one)."""
    values = {}
    for name in schema.names if names is None else names:
        try:
            values[name] = node.get_parameter(name).value
        except ParameterUninitializedException:      # an empty list, declared by type
            values[name] = []
    return schema.validate(values)


def load_parameters(node: Node, schema: Schema) -> dict[str, Any]:
    """What a plain node calls first: warn about unknown overrides, declare, validate. A bad
    value is logged as an error and raised (ParameterError): the node fails to start."""
    logger = node.get_logger()
    for problem in unknown_parameters(node, schema):
        logger.warning(problem)
    declare_parameters(node, schema)
    try:
        return read_parameters(node, schema)
    except ParameterError as err:
        logger.error(str(err))
        raise
