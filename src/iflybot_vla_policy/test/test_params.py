"""The parameter schema (params.py): typed values, errors that name the key, the value and what
is allowed, unknown keys with the closest known name, and ROS 2 params files checked."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from iflybot_vla_policy.params import (
    Param,
    ParameterError,
    Schema,
    check_params_file,
    load_params_file,
    node_values,
)


def _even(value: int) -> None:
    if value % 2:
        raise ValueError(f'{value} is odd; the filter needs an even number of taps')


def _low_below_high(values: dict) -> None:
    if not values['low_hz'] < values['high_hz']:
        raise ParameterError('low_hz', f"{values['low_hz']} must be below high_hz "
                                       f"({values['high_hz']})")


SCHEMA = Schema('camera_driver', (
    Param('rate_hz', 15.0, 'frames per second', gt=0.0, le=60.0),
    Param('width', 320, 'image width, px', ge=16, le=1920),
    Param('encoding', 'rgb8', 'pixel format', choices=('rgb8', 'bgr8', 'mono8')),
    Param('enabled', True, 'publish at all'),
    Param('topics', ['image_raw', 'camera_info'], 'what to publish'),
    Param('gains', [1.0, 1.0], 'per-channel gains', ge=0.0),
    Param('extra_topics', (), 'more topics', kind='str_list'),
    Param('taps', 4, 'filter taps', ge=0, check=_even),
    Param('low_hz', 1.0, 'band low end', ge=0.0),
    Param('high_hz', 10.0, 'band high end', ge=0.0),
), checks=(_low_below_high,))


def _error(values: dict) -> ParameterError:
    with pytest.raises(ParameterError) as info:
        SCHEMA.validate(values)
    return info.value


# ------------------------------------------------------------------------------ values
def test_missing_keys_take_the_defaults_and_lists_come_back_as_tuples() -> None:
    values = SCHEMA.validate({'width': 640})
    assert values['width'] == 640 and values['rate_hz'] == 15.0
    assert values['topics'] == ('image_raw', 'camera_info') and values['extra_topics'] == ()
    assert list(values) == list(SCHEMA.names)


def test_an_integer_for_a_float_parameter_is_the_float_and_true_strings_are_bools() -> None:
    values = SCHEMA.validate({'rate_hz': 30, 'enabled': 'False', 'gains': [1, 2.5],
                              'width': 640.0})
    assert values['rate_hz'] == 30.0 and isinstance(values['rate_hz'], float)
    assert values['enabled'] is False and values['gains'] == (1.0, 2.5)
    assert values['width'] == 640 and isinstance(values['width'], int)


def test_a_value_out_of_range_names_the_parameter_the_value_and_the_range() -> None:
    err = _error({'rate_hz': -1})
    assert err.name == 'rate_hz'
    assert str(err) == 'parameter rate_hz: -1.0 is out of range: must be > 0 and <= 60'
    assert str(_error({'width': 8})) == ('parameter width: 8 is out of range: must be in '
                                         '[16, 1920]')


def test_a_value_outside_the_choices_names_them_and_the_closest() -> None:
    assert str(_error({'encoding': 'rgb'})) == (
        "parameter encoding: 'rgb' is not one of ['rgb8', 'bgr8', 'mono8'] "
        "(did you mean 'rgb8'?)")


@pytest.mark.parametrize('name, value, kind', [
    ('width', 'wide', 'int'), ('width', 2.5, 'int'), ('width', True, 'int'),
    ('rate_hz', math.nan, 'float'), ('rate_hz', math.inf, 'float'), ('rate_hz', '15', 'float'),
    ('enabled', 1, 'bool'), ('encoding', 8, 'str'), ('topics', 'image_raw', 'str_list'),
    ('gains', [1.0, 'x'], 'float_list')])
def test_a_value_of_the_wrong_type_names_the_expected_type(name: str, value: object,
                                                           kind: str) -> None:
    err = _error({name: value})
    assert err.name == name and f'expected {kind}, got {value!r}' in str(err)


def test_every_item_of_a_list_is_checked() -> None:
    assert str(_error({'gains': [1.0, -0.5]})) == ('parameter gains: -0.5 is out of range: '
                                                   'must be >= 0')


def test_a_check_reason_is_given_with_the_parameter_name() -> None:
    assert str(_error({'taps': 5})) == ('parameter taps: 5 is odd; the filter needs an even '
                                        'number of taps')


def test_a_rule_across_parameters_runs_on_the_typed_values() -> None:
    assert _error({'low_hz': 20}).name == 'low_hz'
    assert SCHEMA.validate({'low_hz': 20, 'high_hz': 30})['low_hz'] == 20.0


def test_errors_lists_unknown_keys_and_every_bad_value() -> None:
    assert SCHEMA.errors({'widht': 640, 'rate_hz': 0.0, 'encoding': 'yuv'}) == [
        "unknown parameter 'widht' ignored; did you mean 'width'?",
        'parameter rate_hz: 0.0 is out of range: must be > 0 and <= 60',
        "parameter encoding: 'yuv' is not one of ['rgb8', 'bgr8', 'mono8']"]
    assert SCHEMA.errors({'low_hz': 50.0}) == [
        'parameter low_hz: 50.0 must be below high_hz (10.0)']
    assert SCHEMA.errors(SCHEMA.defaults()) == []


# ------------------------------------------------------------------------------ unknown keys
def test_an_unknown_key_is_named_with_the_closest_known_one() -> None:
    assert SCHEMA.unknown(['rate_h', 'width', 'colour_space']) == [
        "unknown parameter 'colour_space' ignored",
        "unknown parameter 'rate_h' ignored; did you mean 'rate_hz'?"]


def test_parameters_that_rclpy_declares_are_not_unknown() -> None:
    assert SCHEMA.unknown(['use_sim_time', 'start_type_description_service',
                           'qos_overrides./image_raw.publisher.depth']) == []


# ------------------------------------------------------------------------------ the schema
def test_a_default_that_breaks_its_own_rule_fails_when_the_schema_is_written() -> None:
    with pytest.raises(ParameterError, match='rate_hz'):
        Param('rate_hz', 0.0, 'frames per second', gt=0.0)
    with pytest.raises(TypeError, match='declared twice'):
        Schema('n', (Param('a', 1, 'x'), Param('a', 2, 'y')))
    with pytest.raises(TypeError, match='bounds on a str'):
        Param('name', 'a', 'x', ge=0)
    with pytest.raises(TypeError, match='empty list'):
        Param('names', [], 'x')
    with pytest.raises(TypeError, match='no description'):
        Param('a', 1, '')


def test_the_allowed_values_read_as_words() -> None:
    assert [SCHEMA[n].constraint() for n in ('rate_hz', 'width', 'encoding', 'enabled',
                                             'gains')] == [
        '> 0 and <= 60', 'in [16, 1920]', 'one of rgb8, bgr8, mono8', '', 'each >= 0']


def test_the_markdown_table_has_a_row_per_parameter_with_its_yaml_default() -> None:
    table = SCHEMA.markdown().splitlines()
    assert len(table) == 2 + len(SCHEMA.names)
    assert table[2] == '| `rate_hz` | float | `15.0` | > 0 and <= 60 | frames per second |'
    assert '| `topics` | str_list | `[image_raw, camera_info]` |' in table[6]


# ------------------------------------------------------------------------------ params files
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / 'params.yaml'
    path.write_text(text)
    return path


def test_sections_apply_by_node_name_wildcards_and_order(tmp_path: Path) -> None:
    path = _write(tmp_path, """
/**:
  ros__parameters: {width: 100, rate_hz: 5.0}
camera_driver:
  ros__parameters: {width: 200, filter: {order: 2}}
/**/camera_driver:
  ros__parameters: {encoding: bgr8}
/ns/camera_driver:
  ros__parameters: {width: 300}
/*/other:
  ros__parameters: {width: 400}
""")
    sections = load_params_file(path)
    assert node_values(sections, 'camera_driver') == {
        'width': 200, 'rate_hz': 5.0, 'filter.order': 2, 'encoding': 'bgr8'}
    assert node_values(sections, '/ns/camera_driver')['width'] == 300
    assert node_values(sections, '/ns/other') == {'width': 400, 'rate_hz': 5.0}
    assert node_values(sections, '/other') == {'width': 100, 'rate_hz': 5.0}


def test_a_params_file_check_names_unknown_keys_bad_values_and_stray_sections(
        tmp_path: Path) -> None:
    path = _write(tmp_path, """
camera_driver:
  ros__parameters:
    rate_hx: 30.0
    encoding: yuv
    use_sim_time: true
camera_drivr:
  ros__parameters: {width: 640}
""")
    assert check_params_file(path, [SCHEMA]) == [
        f"{path}: section 'camera_drivr' applies to none of ['camera_driver']; did you mean "
        "'camera_driver'?",
        f"{path}: camera_driver: unknown parameter 'rate_hx' ignored; did you mean 'rate_hz'?",
        f"{path}: camera_driver: parameter encoding: 'yuv' is not one of ['rgb8', 'bgr8', "
        "'mono8']"]


def test_a_good_params_file_has_no_problems(tmp_path: Path) -> None:
    path = _write(tmp_path, '/**:\n  ros__parameters:\n    width: 640\n    gains: [0.5, 2]\n')
    assert check_params_file(path, [SCHEMA]) == []


@pytest.mark.parametrize('text, problem', [
    ('camera_driver:\n  width: 640\n', "section 'camera_driver' has no 'ros__parameters'"),
    ('camera_driver:\n  ros__parameters: {}\n  width: 1\n', "unexpected keys ['width']"),
    ('- a\n- b\n', 'expected a mapping of node names'),
    ('a: [\n', 'not YAML')])
def test_a_file_that_is_no_params_file_is_named(tmp_path: Path, text: str,
                                                problem: str) -> None:
    (found,) = check_params_file(_write(tmp_path, text), [SCHEMA])
    assert found.startswith(str(tmp_path)) and problem in found
