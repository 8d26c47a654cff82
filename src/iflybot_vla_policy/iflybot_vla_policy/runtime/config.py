"""Parameters of the policy node as one validated, frozen config (plain Python: the node declares
them from `NodeConfig` and `DESCRIPTIONS`, the runtime reads them)."""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from iflybot_vla_policy.chunking import STRATEGIES
from iflybot_vla_policy.robot import RobotSpec
from iflybot_vla_policy.safety import SafetyConfig

# An instruction longer than this is refused: every /vla/status repeats it, and the model's
# tokenizer keeps only its first max_text_tokens anyway (a 1 MB one stalled inference).
MAX_INSTRUCTION_CHARS = 2000


@dataclass(frozen=True)
class NodeConfig:
    """Validated parameters of the node (see src/iflybot_bringup/config/policy.yaml)."""

    checkpoint: str = ''
    preset: str = 'tiny'
    seed: int = 0
    noise_scale: float = -1.0
    device: str = 'cpu'
    torch_threads: int = 0
    inference_process: bool = True
    inference_backend: str = 'local'
    server_uri: str = 'ws://127.0.0.1:8000'
    api_key: str = ''
    instruction: str = ''
    action_mode: str = 'joint'
    control_rate_hz: float = 50.0
    inference_rate_hz: float = 5.0
    status_rate_hz: float = 5.0
    warmup_inferences: int = 1
    execution_strategy: str = 'blend'
    commit_latency_s: float = 0.05
    max_observation_skew_s: float = 0.0
    ensemble_decay: float = 0.01
    camera_names: tuple[str, ...] = ('scene_camera', 'wrist_camera')
    camera_topics: tuple[str, ...] = ('/scene_camera/color/image_raw',
                                      '/wrist_camera/color/image_raw')
    joint_state_topic: str = '/joint_states'
    arm_joint_names: tuple[str, ...] = ()
    finger_joint_names: tuple[str, ...] = ()
    trajectory_topic: str = '/fr3_arm_controller/joint_trajectory'
    stamp_trajectories: bool = False
    twist_topic: str = '/servo_node/delta_twist_cmds'
    twist_frame: str = 'fr3_link0'
    gripper_topic: str = '/vla/gripper_command'
    task_success_topic: str = '/sim/task_success'
    gripper_speed: float = 0.05
    gripper_force: float = 20.0
    gripper_deadband: float = 0.005
    grasp_width: float = 0.01
    velocity_scale: float = 0.5
    acceleration_scale: float = 0.5
    position_margin: float = 0.05
    max_step: float = 0.5
    hold_on_large_step: bool = False
    max_tracking_error: float = 0.3
    workspace_margin: float = 0.0
    joint_state_timeout_s: float = 0.25
    camera_timeout_s: float = 0.5


DESCRIPTIONS: dict[str, str] = {
    'checkpoint': 'checkpoint directory (Policy.from_checkpoint); empty: build `preset`',
    'preset': 'model preset built with random weights when checkpoint is empty (tiny, ...)',
    'seed': 'seed of the random weights (preset) and of the sampling noise',
    'noise_scale': 'std of the flow starting noise in [0, 1]: 1 samples, 0 is deterministic; '
                   "negative: the checkpoint's bundle.yaml inference.noise_scale, else 1",
    'device': 'torch device of the local model: cpu, cuda, cuda:0, ...',
    'torch_threads': 'CPU threads of a local model; 0: torch default (one per core)',
    'inference_process': 'local model in a child process (true: the executor never waits for '
                         'the model interpreter lock) or on a thread of this one (false)',
    'inference_backend': 'local (model in this process) or remote (iflybot serve / openpi)',
    'server_uri': 'websocket URI of the policy server (inference_backend: remote)',
    'api_key': 'API key sent as "Authorization: Api-Key <key>" (remote); empty: none',
    'instruction': 'instruction to start with; empty waits for /vla/instruction or a goal',
    'action_mode': 'joint (JointTrajectory) or ee_delta (TwistStamped to MoveIt Servo)',
    'control_rate_hz': 'rate of the control timer (watchdog, gripper, ee_delta twists)',
    'inference_rate_hz': 'chunks requested per second (one JointTrajectory each)',
    'status_rate_hz': 'rate of /vla/status (>= 2) ; /diagnostics runs at 1 Hz',
    'warmup_inferences': 'inferences run on a blank observation during configure',
    'execution_strategy': 'how a new chunk joins the executing one: blend (freeze what runs '
                          'during the delay, blend out the rest), rtc (real-time chunking in '
                          'the denoiser: local backend), ensemble or naive',
    'commit_latency_s': 's after a splice before the new command acts (blend and rtc freeze '
                        'the old actions until then)',
    'ensemble_decay': 'temporal ensembling weight exp(-m i) of the i-th oldest chunk',
    'max_observation_skew_s': 'largest spread (s) of the stamps of the frames and joint state '
                              'of one observation, each taken nearest to the frames; 0: 3/4 of '
                              'the camera period',
    'camera_names': 'camera names the model expects, in the order of camera_topics',
    'camera_topics': 'sensor_msgs/Image topics, one per camera name',
    'joint_state_topic': 'sensor_msgs/JointState topic with arm and finger joints',
    'arm_joint_names': 'arm joints in action order; empty: from config/robot/fr3.yaml',
    'finger_joint_names': 'finger joints summed into the gripper width; empty: fr3.yaml',
    'trajectory_topic': 'JointTrajectoryController topic (joint mode)',
    'stamp_trajectories': 'stamp trajectories with their start time (controller on this '
                          'clock) instead of zero (start on receipt)',
    'twist_topic': 'MoveIt Servo twist topic (ee_delta mode)',
    'twist_frame': 'frame of the twist commands (the robot base)',
    'gripper_topic': 'iflybot_vla_msgs/GripperCommand topic, published on change',
    'task_success_topic': 'std_msgs/Bool that ends a run_policy goal with success: a true '
                          'after a false received during the goal',
    'gripper_speed': 'finger speed of gripper commands, m/s',
    'gripper_force': 'grasp force of gripper commands, N',
    'gripper_deadband': 'm the width target must change by before a new gripper command',
    'grasp_width': 'targets at or below this width (m) are sent as grasps',
    'velocity_scale': 'fraction of the joint velocity limits (fr3.yaml) trajectories may use',
    'acceleration_scale': 'fraction of the joint acceleration limits',
    'position_margin': 'rad kept clear of every joint position limit',
    'max_step': 'rad a target may lie from the measured state beyond the velocity allowance',
    'hold_on_large_step': 'true: hold on a target beyond max_step; false: clamp it',
    'max_tracking_error': 'rad between command and measurement before ERROR and hold',
    'workspace_margin': 'm the TCP workspace box of fr3.yaml is shrunk by',
    'joint_state_timeout_s': 'hold when the newest joint state is older than this',
    'camera_timeout_s': 'hold when the newest image of a camera is older than this',
}

_CHOICES = {'inference_backend': ('local', 'remote'), 'action_mode': ('joint', 'ee_delta'),
            'execution_strategy': STRATEGIES}
_POSITIVE = ('control_rate_hz', 'inference_rate_hz', 'gripper_speed', 'max_step',
             'max_tracking_error', 'joint_state_timeout_s', 'camera_timeout_s')
_NON_NEGATIVE = ('commit_latency_s', 'max_observation_skew_s', 'ensemble_decay',
                 'gripper_force', 'gripper_deadband', 'grasp_width', 'position_margin',
                 'workspace_margin', 'warmup_inferences', 'torch_threads')


def parse_config(values: dict[str, Any], robot: RobotSpec) -> NodeConfig:
    """Parameter values -> NodeConfig; ValueError naming the parameter on any bad value."""
    out: dict[str, Any] = {}
    for f in fields(NodeConfig):
        default = getattr(NodeConfig, f.name)
        value = values.get(f.name, default)
        try:
            out[f.name] = _coerce(value, default)
        except (TypeError, ValueError):
            raise ValueError(f'parameter {f.name}: expected {type(default).__name__}, got '
                             f'{value!r}') from None
    for name, choices in _CHOICES.items():
        if out[name] not in choices:
            raise ValueError(f'parameter {name}: {out[name]!r} is not one of {list(choices)}')
    for name in _POSITIVE:
        if not out[name] > 0:
            raise ValueError(f'parameter {name}: must be > 0, got {out[name]}')
    for name in _NON_NEGATIVE:
        if not out[name] >= 0:
            raise ValueError(f'parameter {name}: must be >= 0, got {out[name]}')
    if out['status_rate_hz'] < 2.0:
        raise ValueError(f'parameter status_rate_hz: must be >= 2, got {out["status_rate_hz"]}')
    if out['inference_rate_hz'] > out['control_rate_hz']:
        raise ValueError('parameter inference_rate_hz: must not exceed control_rate_hz')
    if not (out['noise_scale'] < 0 or 0 <= out['noise_scale'] <= 1):   # NaN fails both
        raise ValueError(f'parameter noise_scale: must be in [0, 1] (or negative for the '
                         f'checkpoint\'s), got {out["noise_scale"]}')
    for name in ('velocity_scale', 'acceleration_scale'):
        if not 0 < out[name] <= 1:
            raise ValueError(f'parameter {name}: must be in (0, 1], got {out[name]}')
    if len(out['camera_names']) != len(out['camera_topics']) or not out['camera_names']:
        raise ValueError('parameter camera_topics: needs one topic per camera_names entry, got '
                         f'{list(out["camera_topics"])} for {list(out["camera_names"])}')
    if not out['arm_joint_names']:
        out['arm_joint_names'] = robot.arm_joint_names
    if not out['finger_joint_names']:
        out['finger_joint_names'] = robot.finger_joint_names
    if len(out['arm_joint_names']) != robot.n_joints:
        raise ValueError(f'parameter arm_joint_names: needs {robot.n_joints} names, got '
                         f'{list(out["arm_joint_names"])}')
    if out['inference_backend'] == 'local' and not (out['checkpoint'] or out['preset']):
        raise ValueError('parameter checkpoint: set checkpoint or preset')
    if out['execution_strategy'] == 'rtc' and out['inference_backend'] != 'local':
        raise ValueError('parameter execution_strategy: rtc needs inference_backend local (the '
                         "remote protocol carries no executing chunk); use 'blend'")
    if out['inference_backend'] == 'remote' and not out['server_uri'].startswith(('ws://',
                                                                                 'wss://')):
        raise ValueError(f'parameter server_uri: must start with ws:// or wss://, got '
                         f'{out["server_uri"]!r}')
    return NodeConfig(**out)


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ('true', 'false'):
            return value.lower() == 'true'
        raise ValueError(value)
    if isinstance(default, int):
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError(value)
        return int(float(value))
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError(value)
        result = float(value)
        if not math.isfinite(result):
            raise ValueError(value)
        return result
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(',', ' ').split() if v]
        if not all(isinstance(v, str) for v in value):
            raise ValueError(value)
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError(value)
    return value


def safety_config(cfg: NodeConfig) -> SafetyConfig:
    return SafetyConfig(velocity_scale=cfg.velocity_scale,
                        acceleration_scale=cfg.acceleration_scale,
                        position_margin=cfg.position_margin, max_step=cfg.max_step,
                        hold_on_large_step=cfg.hold_on_large_step,
                        max_tracking_error=cfg.max_tracking_error,
                        workspace_margin=cfg.workspace_margin)


def unknown_parameters(names: Iterable[str]) -> list[str]:
    """Parameter names that are no field of NodeConfig (typos in a params file), each named
    with the closest known name, so that they are not silently ignored."""
    known = [f.name for f in fields(NodeConfig)]
    problems = []
    for name in sorted(set(names) - set(known)):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        problems.append(f"unknown parameter '{name}' ignored{hint}")
    return problems
