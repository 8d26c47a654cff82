"""Every node's parameters come from its schema (issue 24): the shipped params files and graphs
pass the schemas, docs/parameters.md is generated from them, and over DDS a misspelled key
warns with the closest known name while a bad value fails the start naming it.

`python test_node_params.py` rewrites docs/parameters.md from the schemas.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

rclpy = pytest.importorskip('rclpy')

from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.parameter_client import AsyncParameterClient  # noqa: E402
from rclpy.qos import qos_profile_rosout_default  # noqa: E402

from iflybot_bringup import graph as graph_mod  # noqa: E402
from iflybot_bringup.foxglove_bridge import SCHEMA as FOXGLOVE  # noqa: E402
from iflybot_bringup.gripper_bridge import SCHEMA as GRIPPER_BRIDGE  # noqa: E402
from iflybot_vla_policy.params import (  # noqa: E402
    Param,
    ParameterError,
    Schema,
    check_params_file,
    load_params_file,
    node_values,
)
from iflybot_vla_policy.ros.expert_teleop_node import SCHEMA as EXPERT_TELEOP  # noqa: E402
from iflybot_vla_policy.ros.expert_teleop_node import ExpertTeleopNode  # noqa: E402
from iflybot_vla_policy.ros.parameters import declare_parameters, read_parameters  # noqa: E402
from iflybot_vla_policy.ros.policy_node import PolicyNode  # noqa: E402
from iflybot_vla_policy.ros.recorder_node import SCHEMA as RECORDER  # noqa: E402
from iflybot_vla_policy.ros.sim_node import SCHEMA as SIM  # noqa: E402
from iflybot_vla_policy.ros.sim_node import SimNode  # noqa: E402
from iflybot_vla_policy.ros.teleop_node import SCHEMA as TELEOP  # noqa: E402
from iflybot_vla_policy.ros.teleop_node import TeleopNode  # noqa: E402
from iflybot_vla_policy.runtime.config import SCHEMA as POLICY  # noqa: E402

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / 'src' / 'iflybot_bringup' / 'config'
DOC = REPO / 'docs' / 'parameters.md'
SCHEMAS = (POLICY, SIM, RECORDER, TELEOP, EXPERT_TELEOP, GRIPPER_BRIDGE, FOXGLOVE)
EXECUTABLES = {('iflybot_vla_policy', 'iflybot_policy'): POLICY,
               ('iflybot_vla_policy', 'iflybot_sim'): SIM,
               ('iflybot_vla_policy', 'iflybot_recorder'): RECORDER,
               ('iflybot_vla_policy', 'iflybot_teleop'): TELEOP,
               ('iflybot_vla_policy', 'iflybot_expert_teleop'): EXPERT_TELEOP,
               ('iflybot_bringup', 'gripper_bridge'): GRIPPER_BRIDGE,
               ('iflybot_bringup', 'foxglove_bridge'): FOXGLOVE}
CONFIG_FILES = {'policy.yaml': (POLICY,), 'sim.yaml': (SIM,), 'recorder.yaml': (RECORDER,),
                'teleop.yaml': (TELEOP, EXPERT_TELEOP), 'foxglove.yaml': (FOXGLOVE,)}


# ------------------------------------------------------------------------------ files
def test_no_other_params_file_in_config_names_one_of_these_nodes() -> None:
    """Files for other nodes (MoveIt Servo, the controller, camera drivers, ...) are theirs;
    one that names a node with a schema here must be in CONFIG_FILES to be checked."""
    ours = {s.node for s in SCHEMAS}
    for path in sorted(CONFIG.glob('*.yaml')):
        if path.name in CONFIG_FILES:
            continue
        try:
            sections = load_params_file(path)
        except ValueError:
            continue                  # no ROS params file (e.g. a ros_gz_bridge topic list)
        named = {key.strip('/').split('/')[-1] for key in sections}
        assert not named & ours, f'{path.name} configures {named & ours}: add it to CONFIG_FILES'


@pytest.mark.parametrize('name', sorted(CONFIG_FILES))
def test_a_shipped_params_file_passes_its_nodes_schemas(name: str) -> None:
    assert check_params_file(CONFIG / name, CONFIG_FILES[name]) == []


def test_the_shipped_policy_params_file_sets_every_policy_parameter() -> None:
    values = node_values(load_params_file(CONFIG / 'policy.yaml'), POLICY.node)
    assert sorted(values) == sorted(POLICY.names)


def _graph_cases() -> Iterator[tuple[str, dict[str, str]]]:
    """Every graph with its default arguments, and with each bool argument flipped."""
    for name in graph_mod.graph_names():
        graph = graph_mod.load_graph(name)
        yield name, {}
        for arg in graph.args:
            if arg.type == 'bool':
                flipped = not graph_mod.parse_bool(str(arg.default), arg.name)
                yield name, {arg.name: str(flipped).lower()}


def test_every_node_of_every_graph_gets_values_its_schema_accepts() -> None:
    checked, problems = set(), []
    for name, overrides in _graph_cases():
        resolved = graph_mod.resolve(graph_mod.load_graph(name), overrides)
        for node in resolved.nodes:
            key = (node.spec.package, node.spec.executable)
            if key not in EXECUTABLES:
                continue
            values: dict[str, Any] = {}
            for path in node.params_files:
                values.update(node_values(load_params_file(path), node.fqn))
            values.update(node.params)
            problems += [f'graph {name} {overrides}: {node.name}: {p}'
                         for p in EXECUTABLES[key].errors(values)]
            checked.add(key[1])
    assert problems == []
    # the keyboard teleop is started by hand (it needs the terminal), in no graph
    assert checked == {e for _, e in EXECUTABLES} - {'iflybot_teleop'}


# ------------------------------------------------------------------------------ docs
DOC_INTRO = """# Node parameters

Generated from the nodes' parameter schemas (`SCHEMA` in each node module, written with
`iflybot_vla_policy/params.py`) by `python src/iflybot_vla_policy/test/test_node_params.py`; a
test checks that it is current.

Each node declares these parameters with their descriptions and ranges (`ros2 param describe`
shows them), refuses to start on a bad value and names it (`parameter camera_rate: -1.0 is out
of range: must be in [0, 60]`), warns about a key it does not know with the closest known one
(`unknown parameter 'joint_state_rat' ignored; did you mean 'joint_state_rate'?`), and reads its
parameters once at start, so they are read-only afterwards. The policy node is a lifecycle node:
it reads and checks its parameters on configure, where a bad value fails the transition naming
it, and `ros2 param set` (checked against the schema) fixes it before configuring again. An
integer is accepted for a float parameter (`camera_rate:=15`), and `[]` for an empty list. The
params files in `src/iflybot_bringup/config/` and every graph's node parameters are checked
against these schemas by `test_node_params.py`.

Topics: the simulator's are relative names (`joint_states`, `scene_camera/color/image_raw`,
`fr3_arm_controller/joint_trajectory`, ...: `/joint_states` and so on in the root namespace),
remapped or namespaced as a driver's are; `/clock` stays absolute, where rclpy's time source
listens. The other nodes take their topics as parameters.
"""


def _rules(schema: Schema) -> str:
    """The schema's rules across parameters, from their docstrings."""
    rules = [' '.join(rule.__doc__.split()) for rule in schema.checks if rule.__doc__]
    if not rules:
        return ''
    return '\nAcross parameters:\n\n' + ''.join(f'- {rule}\n' for rule in rules)


def render_doc() -> str:
    return DOC_INTRO + ''.join(f'\n## {s.node}\n\n{s.markdown()}{_rules(s)}' for s in SCHEMAS)


def test_docs_parameters_md_is_generated_from_the_schemas() -> None:
    assert DOC.read_text() == render_doc(), f'run python {__file__} to update {DOC}'


# ------------------------------------------------------------------------------ over DDS
class Rosout:
    """/rosout lines of a context (what a user sees in the console and in rqt_console)."""

    def __init__(self, context: Any) -> None:
        self.node = rclpy.create_node('rosout_tap', context=context)
        self.lines: list[tuple[str, int, str]] = []
        self.node.create_subscription(Log, '/rosout', self._on_log, qos_profile_rosout_default)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)

    def _on_log(self, msg: Log) -> None:
        self.lines.append((msg.name, msg.level, msg.msg))

    def wait_for(self, predicate: Callable[[tuple[str, int, str]], bool],
                 timeout: float = 10.0) -> tuple[str, int, str] | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if predicate(line):
                    return line
            self.executor.spin_once(timeout_sec=0.05)
        return None


@pytest.fixture
def params_context(tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """A context whose nodes read the given params file, as `--ros-args --params-file`."""
    contexts = []

    def make(text: str) -> Any:
        path = tmp_path / f'params{len(contexts)}.yaml'
        path.write_text(text)
        context = rclpy.Context()
        rclpy.init(context=context, args=['test', '--ros-args', '--params-file', str(path)])
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        rclpy.try_shutdown(context=context)


def test_a_misspelled_sim_parameter_warns_with_the_closest_name_and_keeps_the_default(
        params_context) -> None:
    context = params_context('iflybot_sim:\n  ros__parameters:\n    joint_state_rat: 50.0\n'
                             '    camera_rate: 0\n')
    rosout = Rosout(context)
    node = SimNode(context=context)
    try:
        line = rosout.wait_for(lambda ln: 'joint_state_rat' in ln[2])
        assert line == ('iflybot_sim', Log.WARN, "unknown parameter 'joint_state_rat' ignored; "
                                                 "did you mean 'joint_state_rate'?")
        assert node.get_parameter('joint_state_rate').value == 100.0
        assert node.get_parameter('camera_rate').value == 0.0     # the integer 0 as a float
    finally:
        node.shutdown()
        node.destroy_node()


def test_the_sim_topics_follow_its_namespace_and_remaps_and_clock_stays_absolute() -> None:
    context = rclpy.Context()
    rclpy.init(context=context, args=['test', '--ros-args', '-r', '__ns:=/cell2', '-r',
                                      'sim/task_success:=/judge/success', '-p', 'camera_rate:=0'])
    node = SimNode(context=context)
    try:
        published = {name for name, _ in node.get_publisher_names_and_types_by_node(
            'iflybot_sim', '/cell2')}
        assert {'/cell2/joint_states', '/cell2/scene_camera/color/image_raw',
                '/judge/success', '/clock'} <= published
        subscribed = {name for name, _ in node.get_subscriber_names_and_types_by_node(
            'iflybot_sim', '/cell2')}
        assert '/cell2/fr3_arm_controller/joint_trajectory' in subscribed
    finally:
        node.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def _run_node(module: str, *params: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, '-m', module, '--ros-args']
    for p in params:
        argv += ['-p', p]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env=os.environ.copy(), stdin=subprocess.DEVNULL)


def test_a_bad_sim_value_fails_the_start_naming_the_parameter() -> None:
    proc = _run_node('iflybot_vla_policy.ros.sim_node', 'camera_rate:=-1')
    assert proc.returncode == 1, proc.stderr
    assert ('parameter camera_rate: -1.0 is out of range: must be in [0, 60]' in proc.stderr
            and 'Traceback' not in proc.stderr), proc.stderr


def test_an_unknown_sim_task_fails_naming_the_task_parameter_and_the_tasks(
        ros_context) -> None:
    with pytest.raises(ParameterError) as info:
        SimNode(context=ros_context, parameter_overrides=[Parameter('task', value='pick_plac')])
    assert info.value.name == 'task'
    assert str(info.value) == ("parameter task: 'pick_plac' is not one of ['drawer', "
                               "'pick_place', 'push', 'stack'] (did you mean 'pick_place'?)")


def test_a_misspelled_teleop_parameter_warns_with_the_closest_name(params_context) -> None:
    context = params_context('iflybot_teleop:\n  ros__parameters:\n    rate_hzz: 10.0\n'
                             "    spacemouse: 'off'\n    linear_speed: 1\n")
    rosout = Rosout(context)
    node = TeleopNode(context=context)
    try:
        line = rosout.wait_for(lambda ln: 'rate_hzz' in ln[2])
        assert line == ('iflybot_teleop', Log.WARN,
                        "unknown parameter 'rate_hzz' ignored; did you mean 'rate_hz'?")
        assert node.teleop.config.linear_speed == 1.0
    finally:
        node.destroy_node()


def test_a_bad_teleop_value_fails_the_start_naming_the_parameter() -> None:
    proc = _run_node('iflybot_vla_policy.ros.teleop_node', 'spacemouse:=of')
    assert proc.returncode == 1, proc.stderr
    assert ("parameter spacemouse: 'of' is not one of ['auto', 'on', 'off'] (did you mean "
            "'off'?)" in proc.stderr and 'Traceback' not in proc.stderr), proc.stderr


def test_teleop_gripper_widths_in_the_wrong_order_name_the_closed_width(ros_context) -> None:
    with pytest.raises(ParameterError) as info:
        TeleopNode(context=ros_context, parameter_overrides=[
            Parameter('spacemouse', value='off'), Parameter('gripper_closed_width', value=0.09)])
    assert str(info.value) == ('parameter gripper_closed_width: 0.09 must be below '
                               'gripper_open_width (0.08)')


def test_a_bad_expert_teleop_value_names_the_parameter(ros_context) -> None:
    with pytest.raises(ParameterError, match=r'^parameter horizon: 0 is out of range: must be '
                                             r'>= 1$'):
        ExpertTeleopNode(context=ros_context, parameter_overrides=[
            Parameter('horizon', value=0)])


def test_teleop_parameters_are_described_and_read_only_over_dds(ros_context) -> None:
    node = TeleopNode(context=ros_context, parameter_overrides=[
        Parameter('spacemouse', value='off'), Parameter('rate_hz', value=20)])
    client_node = rclpy.create_node('param_client', context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    executor.add_node(client_node)
    client = AsyncParameterClient(client_node, 'iflybot_teleop')
    try:
        assert client.wait_for_services(timeout_sec=10.0)

        def call(future: Any) -> Any:
            executor.spin_until_future_complete(future, timeout_sec=10.0)
            assert future.done()
            return future.result()

        (described,) = call(client.describe_parameters(['rate_hz'])).descriptors
        assert described.description == TELEOP['rate_hz'].description
        assert described.additional_constraints == '> 0 and <= 1000'
        assert described.read_only
        (value,) = call(client.get_parameters(['rate_hz'])).values
        assert value.double_value == 20.0                 # given as the integer 20
        (result,) = call(client.set_parameters([Parameter('rate_hz', value=5.0)])).results
        assert not result.successful and 'read-only' in result.reason
    finally:
        executor.shutdown()
        client_node.destroy_node()
        node.destroy_node()


def test_the_policy_node_names_a_bad_value_on_configure_takes_a_fix_and_reads_its_file(
        params_context) -> None:
    """From a params file: `[]` joint lists take the robot's names, topics are parameters, a
    bad value fails configure naming it, a set is checked against the schema, and the fixed
    node configures with the topics it was given."""
    from lifecycle_msgs.msg import State
    from rclpy.lifecycle import TransitionCallbackReturn

    context = params_context(
        'iflybot_policy:\n  ros__parameters:\n    arm_joint_names: []\n'
        '    action_mode: cartesian\n    inference_rate_hz: 2\n    warmup_inferences: 0\n'
        '    inference_process: false\n    status_topic: /cell2/vla/status\n')
    node = PolicyNode(context=context)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert node.configure_error == ("parameter action_mode: 'cartesian' is not one of "
                                        "['joint', 'ee_delta']")
        (refused,) = node.set_parameters([Parameter('status_rate_hz', value=1.0)])
        assert not refused.successful and refused.reason == (
            'parameter status_rate_hz: 1.0 is out of range: must be >= 2')
        (done,) = node.set_parameters([Parameter('action_mode', value='joint')])
        assert done.successful
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS, node.configure_error
        assert node.config.arm_joint_names == node.robot.arm_joint_names
        assert node.config.inference_rate_hz == 2.0
        wanted = {'/cell2/vla/status', '/diagnostics', '/vla/action_chunk', '/vla/markers',
                  '/fr3_arm_controller/joint_trajectory'}
        deadline = time.monotonic() + 10.0   # the graph cache catches up with new publishers
        while True:
            published = {name for name, _ in node.get_publisher_names_and_types_by_node(
                'iflybot_policy', '/')}
            if wanted <= published or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert wanted <= published
        assert '/vla/status' not in published
    finally:
        if node._state_machine.current_state[0] == State.PRIMARY_STATE_INACTIVE:
            node.trigger_cleanup()
        node.destroy_node()


CONFIGURABLE = Schema('configurable', (
    Param('mode', 'joint', 'action mode', choices=('joint', 'ee_delta')),
    Param('rate_hz', 50.0, 'control rate', gt=0.0)), read_only=False)


def test_a_node_that_validates_on_configure_names_a_bad_override_and_takes_a_fix(
        ros_context) -> None:
    """The lifecycle pattern: declare in the constructor, read (and fail) in on_configure,
    `ros2 param set` a good value, configure again."""
    node = rclpy.create_node('configurable', context=ros_context, parameter_overrides=[
        Parameter('mode', value='ee'), Parameter('rate_hz', value=20)])
    try:
        declare_parameters(node, CONFIGURABLE)        # a bad value does not fail construction
        with pytest.raises(ParameterError, match=r"^parameter mode: 'ee' is not one of"):
            read_parameters(node, CONFIGURABLE)
        assert node.get_parameter('mode').value == 'ee'          # as given: ros2 param get
        (refused,) = node.set_parameters([Parameter('mode', value='cartesian')])
        assert not refused.successful
        assert refused.reason.startswith("parameter mode: 'cartesian' is not one of")
        (done,) = node.set_parameters([Parameter('mode', value='ee_delta')])
        assert done.successful
        assert read_parameters(node, CONFIGURABLE) == {'mode': 'ee_delta', 'rate_hz': 20.0}
    finally:
        node.destroy_node()


if __name__ == '__main__':
    DOC.write_text(render_doc())
    print(f'wrote {DOC}')
