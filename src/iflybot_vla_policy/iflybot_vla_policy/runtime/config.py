"""Parameters of the policy node: one `SCHEMA` (each parameter declared once with its default,
description and allowed values; the node declares from it, docs/parameters.md is generated from
it) and `NodeConfig`, the validated, frozen values the runtime reads. Plain Python."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from iflybot_vla_policy.chunking import STRATEGIES
from iflybot_vla_policy.params import Param, ParameterError, Schema
from iflybot_vla_policy.robot import RobotSpec
from iflybot_vla_policy.safety import SafetyConfig
from iflybot_vla_policy.serving import WIRE_FORMATS

# An instruction longer than this is refused: every /vla/status repeats it, and the model's
# tokenizer keeps only its first max_text_tokens anyway (a 1 MB one stalled inference).
MAX_INSTRUCTION_CHARS = 2000


def _noise_scale(value: float) -> None:
    if not (value < 0 or 0 <= value <= 1):
        raise ValueError(f"must be in [0, 1] (or negative for the checkpoint's), got {value}")


def _name(value: str) -> None:
    if not value:
        raise ValueError('must not be empty')


def _topic(name: str, default: str, description: str) -> Param:
    return Param(name, default, description, check=_name)


_POSITIVE = {'gt': 0.0}
_NON_NEGATIVE = {'ge': 0.0}


def _one_topic_per_camera(v: Mapping[str, Any]) -> None:
    """camera_topics has one topic per camera_names entry (at least one)."""
    if not v['camera_names'] or len(v['camera_names']) != len(v['camera_topics']):
        raise ParameterError('camera_topics', 'needs one topic per camera_names entry, got '
                             f'{list(v["camera_topics"])} for {list(v["camera_names"])}')


def _inference_within_control(v: Mapping[str, Any]) -> None:
    """inference_rate_hz is at most control_rate_hz."""
    if v['inference_rate_hz'] > v['control_rate_hz']:
        raise ParameterError('inference_rate_hz', f'{v["inference_rate_hz"]} must not exceed '
                             f'control_rate_hz ({v["control_rate_hz"]})')


def _model_source(v: Mapping[str, Any]) -> None:
    """local needs checkpoint or preset; rtc needs inference_backend local; remote needs a
    ws:// or wss:// server_uri."""
    if v['inference_backend'] == 'local' and not (v['checkpoint'] or v['preset']):
        raise ParameterError('checkpoint', 'set checkpoint or preset')
    if v['execution_strategy'] == 'rtc' and v['inference_backend'] != 'local':
        raise ParameterError('execution_strategy', 'rtc needs inference_backend local (the '
                             "remote protocol carries no executing chunk); use 'blend'")
    if v['inference_backend'] == 'remote' and not v['server_uri'].startswith(('ws://',
                                                                             'wss://')):
        raise ParameterError('server_uri', f'must start with ws:// or wss://, got '
                             f'{v["server_uri"]!r}')


SCHEMA = Schema('iflybot_policy', (
    # --- model
    Param('checkpoint', '', 'checkpoint directory (Policy.from_checkpoint); empty: build '
          '`preset`'),
    Param('preset', 'tiny', 'model preset built with random weights when checkpoint is empty '
          '(tiny, ...)'),
    Param('seed', 0, 'seed of the random weights (preset) and of the sampling noise'),
    Param('noise_scale', -1.0, 'std of the flow starting noise in [0, 1]: 1 samples, 0 is '
          "deterministic; negative: the checkpoint's bundle.yaml inference.noise_scale, else 1",
          check=_noise_scale),
    Param('device', 'cpu', 'torch device of the local model: cpu, cuda, cuda:0, ...',
          check=_name),
    Param('torch_threads', 0, 'CPU threads of a local model; 0: torch default (one per core)',
          **_NON_NEGATIVE),
    Param('inference_process', True, 'local model in a child process (true: the executor '
          'never waits for the model interpreter lock) or on a thread of this one (false)'),
    Param('inference_backend', 'local', 'local (model in this process) or remote (iflybot '
          'serve / openpi)', choices=('local', 'remote')),
    Param('server_uri', 'ws://127.0.0.1:8000', 'websocket URI of the policy server '
          '(inference_backend: remote)'),
    Param('api_key', '', 'API key sent as "Authorization: Api-Key <key>" (remote); empty: '
          'none'),
    Param('wire_format', 'iflybot', "the remote server's observation and action convention: "
          "iflybot (ours) or droid (openpi's pi0/pi0.5-DROID servers, serving/droid.py)",
          choices=WIRE_FORMATS),
    Param('instruction', '', 'instruction to start with; empty waits for instruction_topic or '
          'a goal'),
    Param('warmup_inferences', 1, 'inferences run on a blank observation during configure',
          **_NON_NEGATIVE),
    # --- control
    Param('action_mode', 'joint', 'joint (JointTrajectory) or ee_delta (TwistStamped to MoveIt '
          'Servo)', choices=('joint', 'ee_delta')),
    Param('control_rate_hz', 50.0, 'rate of the control timer (watchdog, gripper, ee_delta '
          'twists)', **_POSITIVE),
    Param('inference_rate_hz', 5.0, 'chunks requested per second (one JointTrajectory each); '
          'at most control_rate_hz', **_POSITIVE),
    Param('status_rate_hz', 5.0, 'rate of status_topic; diagnostics_topic runs at 1 Hz',
          ge=2.0),
    Param('execution_strategy', 'blend', 'how a new chunk joins the executing one: blend '
          '(freeze what runs during the delay, blend out the rest), rtc (real-time chunking in '
          'the denoiser: local backend), ensemble or naive', choices=STRATEGIES),
    Param('commit_latency_s', 0.05, 's after a splice before the new command acts (blend and '
          'rtc freeze the old actions until then)', **_NON_NEGATIVE),
    Param('max_observation_skew_s', 0.0, 'largest spread (s) of the stamps of the frames and '
          'joint state of one observation, each taken nearest to the frames; 0: 1.5 times the '
          'camera period', **_NON_NEGATIVE),
    Param('ensemble_decay', 0.01, 'temporal ensembling weight exp(-m i) of the i-th oldest '
          'chunk', **_NON_NEGATIVE),
    # --- topics and joints
    Param('camera_names', ('scene_camera', 'wrist_camera'), 'camera names the model expects, '
          'in the order of camera_topics', check=_name),
    Param('camera_topics', ('/scene_camera/color/image_raw', '/wrist_camera/color/image_raw'),
          'sensor_msgs/Image topics, one per camera name', check=_name),
    _topic('joint_state_topic', '/joint_states', 'sensor_msgs/JointState topic with arm and '
           'finger joints'),
    Param('arm_joint_names', (), 'arm joints in action order, one per joint of the robot; '
          'empty: from config/robot/fr3.yaml', kind='str_list', check=_name),
    Param('finger_joint_names', (), 'finger joints summed into the gripper width; empty: '
          'fr3.yaml', kind='str_list', check=_name),
    _topic('trajectory_topic', '/fr3_arm_controller/joint_trajectory',
           'JointTrajectoryController topic (joint mode)'),
    Param('stamp_trajectories', False, 'stamp trajectories with their start time (controller '
          'on this clock) instead of zero (start on receipt)'),
    _topic('twist_topic', '/servo_node/delta_twist_cmds', 'MoveIt Servo twist topic '
           '(ee_delta mode)'),
    Param('twist_frame', 'fr3_link0', 'frame of the twist commands (the robot base)'),
    Param('servo_switch_service', '/servo_node/switch_command_type', 'MoveIt Servo service '
          'switched to TWIST before the first twist (ee_delta mode); empty: never switch'),
    _topic('gripper_topic', '/vla/gripper_command', 'iflybot_vla_msgs/GripperCommand topic, '
           'published on change'),
    _topic('task_success_topic', '/sim/task_success', 'std_msgs/Bool that ends a run_policy '
           'goal with success: a true after a false received during the goal'),
    _topic('instruction_topic', '/vla/instruction', 'std_msgs/String: a new instruction (as '
           'the run_policy goal gives one)'),
    _topic('status_topic', '/vla/status', 'iflybot_vla_msgs/PolicyStatus at status_rate_hz'),
    _topic('chunk_topic', '/vla/action_chunk', 'iflybot_vla_msgs/ActionChunk of every chunk '
           'the model returns'),
    _topic('markers_topic', '/vla/markers', 'visualization_msgs/MarkerArray: the planned TCP '
           'path of each trajectory (joint mode)'),
    _topic('diagnostics_topic', '/diagnostics', 'diagnostic_msgs/DiagnosticArray at 1 Hz'),
    # --- gripper
    Param('gripper_speed', 0.05, 'finger speed of gripper commands, m/s', **_POSITIVE),
    Param('gripper_force', 20.0, 'grasp force of gripper commands, N', **_NON_NEGATIVE),
    Param('gripper_deadband', 0.005, 'm the width target must change by before a new gripper '
          'command', **_NON_NEGATIVE),
    Param('grasp_width', 0.01, 'targets at or below this width (m) are sent as grasps',
          **_NON_NEGATIVE),
    # --- safety
    Param('velocity_scale', 0.5, 'fraction of the joint velocity limits (fr3.yaml) '
          'trajectories may use', gt=0.0, le=1.0),
    Param('acceleration_scale', 0.5, 'fraction of the joint acceleration limits', gt=0.0,
          le=1.0),
    Param('position_margin', 0.05, 'rad kept clear of every joint position limit',
          **_NON_NEGATIVE),
    Param('max_step', 0.5, 'rad a target may lie from the measured state beyond the velocity '
          'allowance', **_POSITIVE),
    Param('hold_on_large_step', False, 'true: hold on a target beyond max_step; false: clamp '
          'it'),
    Param('max_tracking_error', 0.3, 'rad between command and measurement before ERROR and '
          'hold', **_POSITIVE),
    Param('workspace_margin', 0.0, 'm the TCP workspace box of fr3.yaml is shrunk by',
          **_NON_NEGATIVE),
    Param('joint_state_timeout_s', 0.25, 'hold when the newest joint state is older than this',
          **_POSITIVE),
    Param('camera_timeout_s', 0.5, 'hold when the newest image of a camera is older than this',
          **_POSITIVE),
), checks=(_one_topic_per_camera, _inference_within_control, _model_source),
    read_only=False)   # a lifecycle node: fix a bad value with `ros2 param set`, configure again


@dataclass(frozen=True)
class NodeConfig:
    """Validated parameters of the node: the fields of `SCHEMA` (docs/parameters.md), with the
    joint names filled in from the robot description."""

    checkpoint: str
    preset: str
    seed: int
    noise_scale: float
    device: str
    torch_threads: int
    inference_process: bool
    inference_backend: str
    server_uri: str
    api_key: str
    wire_format: str
    instruction: str
    warmup_inferences: int
    action_mode: str
    control_rate_hz: float
    inference_rate_hz: float
    status_rate_hz: float
    execution_strategy: str
    commit_latency_s: float
    max_observation_skew_s: float
    ensemble_decay: float
    camera_names: tuple[str, ...]
    camera_topics: tuple[str, ...]
    joint_state_topic: str
    arm_joint_names: tuple[str, ...]
    finger_joint_names: tuple[str, ...]
    trajectory_topic: str
    stamp_trajectories: bool
    twist_topic: str
    twist_frame: str
    servo_switch_service: str
    gripper_topic: str
    task_success_topic: str
    instruction_topic: str
    status_topic: str
    chunk_topic: str
    markers_topic: str
    diagnostics_topic: str
    gripper_speed: float
    gripper_force: float
    gripper_deadband: float
    grasp_width: float
    velocity_scale: float
    acceleration_scale: float
    position_margin: float
    max_step: float
    hold_on_large_step: bool
    max_tracking_error: float
    workspace_margin: float
    joint_state_timeout_s: float
    camera_timeout_s: float


if [f.name for f in fields(NodeConfig)] != list(SCHEMA.names):   # a bug: fail at import
    raise TypeError('NodeConfig fields and SCHEMA parameters differ: '
                    f'{sorted({f.name for f in fields(NodeConfig)} ^ set(SCHEMA.names))}')


def parse_config(values: Mapping[str, Any], robot: RobotSpec) -> NodeConfig:
    """Parameter values -> NodeConfig (defaults for those not given); ParameterError (a
    ValueError) naming the parameter on any bad value. Joint names default to the robot's."""
    out = SCHEMA.validate(values)
    if not out['arm_joint_names']:
        out['arm_joint_names'] = robot.arm_joint_names
    if not out['finger_joint_names']:
        out['finger_joint_names'] = robot.finger_joint_names
    if len(out['arm_joint_names']) != robot.n_joints:
        raise ParameterError('arm_joint_names', f'needs {robot.n_joints} names, got '
                             f'{list(out["arm_joint_names"])}')
    return NodeConfig(**out)


def safety_config(cfg: NodeConfig) -> SafetyConfig:
    return SafetyConfig(velocity_scale=cfg.velocity_scale,
                        acceleration_scale=cfg.acceleration_scale,
                        position_margin=cfg.position_margin, max_step=cfg.max_step,
                        hold_on_large_step=cfg.hold_on_large_step,
                        max_tracking_error=cfg.max_tracking_error,
                        workspace_margin=cfg.workspace_margin)


def unknown_parameters(names: Iterable[str]) -> list[str]:
    """Parameter names that are no parameter of the node (typos in a params file), each named
    with the closest known name, so that they are not silently ignored."""
    return SCHEMA.unknown(names)
