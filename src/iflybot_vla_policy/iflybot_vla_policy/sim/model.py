"""MJCF of the FR3 with the Franka Hand on a table, generated from `RobotSpec`.

The kinematic chain is built from the modified-DH rows, so the MuJoCo TCP site (`tcp`) is the
same frame as `RobotSpec.forward_kinematics` (a test checks it). Geometry is simple capsules and
boxes; the arm links are visual only (they do not collide), the hand and fingers collide.
Arm joints are torque-driven (motors limited to tau_max); the environment closes a computed-torque
loop around them. Each finger has a position actuator whose force limit is the grasp force.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from iflybot_vla_policy.robot import RobotSpec

PHYSICS_DT = 0.002          # s; 500 Hz physics and control
FINGER_TRAVEL = 0.04        # m per finger
FINGER_KP = 1000.0          # N/m, finger position servo
FINGER_KV = 20.0            # N s/m
# Link masses in kg (franka_description's inertials, rounded); fingers heavier for stability.
LINK_MASSES = (4.97, 0.65, 3.23, 3.59, 1.23, 1.67, 0.74)
HAND_MASS = 0.73
FINGER_MASS = 0.05
LINK_RADII = (0.065, 0.06, 0.06, 0.055, 0.055, 0.05, 0.045)
ARMATURE = (0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05)
DAMPING = (1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5)

# Scene layout (base frame = world frame; the robot stands on the table top at z = 0).
TABLE_MIN = (-0.25, -0.75)
TABLE_MAX = (1.0, 0.75)
TABLE_THICKNESS = 0.04
SCENE_CAMERA_POS = (1.05, -0.6, 0.8)
SCENE_CAMERA_TARGET = (0.4, 0.0, 0.1)
SCENE_CAMERA_FOVY = 55.0
WRIST_CAMERA_FOVY = 75.0
# In the hand frame (z points to the fingertips, x away from the robot at home): behind the
# fingers, looking down and forward, tilted towards the TCP axis.
WRIST_CAMERA_POS = (-0.07, 0.0, 0.03)
WRIST_CAMERA_TILT = 0.45                 # rad


@dataclass(frozen=True)
class SceneSpec:
    """What a task adds to the scene: MJCF for <asset>, <worldbody> and <contact>/<equality>."""

    assets: str = ''
    worldbody: str = ''
    extra: str = ''


def _fmt(values: np.ndarray | tuple[float, ...] | list[float]) -> str:
    return ' '.join(f'{float(v):.10g}' for v in values)


def rot_x_quat(angle: float) -> np.ndarray:
    """Quaternion (w, x, y, z) of a rotation about x."""
    return np.array([math.cos(angle / 2), math.sin(angle / 2), 0.0, 0.0])


def rot_z_quat(angle: float) -> np.ndarray:
    return np.array([math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)])


def look_at_xyaxes(pos: tuple[float, ...], target: tuple[float, ...]) -> str:
    """MJCF `xyaxes` of a camera at pos looking at target with world z up in the image."""
    forward = np.asarray(target, float) - np.asarray(pos, float)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return _fmt(np.concatenate([right, up]))


def _link_offset(robot: RobotSpec, i: int) -> np.ndarray:
    """Origin of link i+1 in the frame of link i (i = 0..n-1), or the flange for the last link."""
    if i + 1 < robot.n_joints:
        a, d, alpha = robot.dh[i + 1]
    else:
        a, d, alpha = 0.0, robot.flange_d, 0.0
    return np.array([a, -math.sin(alpha) * d, math.cos(alpha) * d])


def _arm_link_geoms(robot: RobotSpec, i: int) -> str:
    """Visual capsule to the next joint plus a joint housing; the capsule carries the mass."""
    radius, mass = LINK_RADII[i], LINK_MASSES[i]
    offset = _link_offset(robot, i)
    housing = (f'<geom class="visual" type="cylinder" size="{radius:.3f} {radius:.3f}" '
               f'material="arm_white"/>')
    if np.linalg.norm(offset) < 1e-6:
        return (f'<geom class="visual" type="sphere" size="{radius:.3f}" mass="{mass}" '
                f'material="arm_white"/>' + housing)
    return (f'<geom class="visual" type="capsule" fromto="0 0 0 {_fmt(offset)}" '
            f'size="{radius * 0.85:.3f}" mass="{mass}" material="arm_white"/>' + housing)


def _hand_xml() -> str:
    """Franka Hand: body, two prismatic fingers along the hand y axis, TCP site, wrist camera."""
    c, s = math.cos(WRIST_CAMERA_TILT), math.sin(WRIST_CAMERA_TILT)
    # A camera looks along its -z: here (s, 0, c), i.e. to the fingertips and forward.
    cam_axes = _fmt([0.0, 1.0, 0.0, c, 0.0, -s])   # image up = forward
    pad = ('<geom class="finger" type="box" size="0.01 0.006 0.027" pos="0 {y} 0.027" '
           'mass="{m}"/>')
    return f"""
<body name="fr3_hand" quat="{{hand_quat}}">
  <geom class="collision" type="box" size="0.025 0.1 0.03" pos="0 0 0.03" mass="{HAND_MASS}"
        material="arm_white"/>
  <geom class="visual" type="cylinder" size="0.04 0.01" pos="0 0 0.0" material="arm_dark"/>
  <site name="tcp" pos="0 0 {{tcp}}" size="0.005" rgba="1 0 0 0.5" group="4"/>
  <camera name="wrist_camera" pos="{_fmt(WRIST_CAMERA_POS)}" xyaxes="{cam_axes}"
          fovy="{WRIST_CAMERA_FOVY}"/>
  <geom class="visual" type="box" size="0.012 0.018 0.012" pos="{_fmt(WRIST_CAMERA_POS)}"
        material="arm_dark"/>
  <body name="fr3_leftfinger" pos="0 0 0.0584">
    <joint name="fr3_finger_joint1" class="finger" axis="0 1 0"/>
    {pad.format(y=0.006, m=FINGER_MASS)}
  </body>
  <body name="fr3_rightfinger" pos="0 0 0.0584">
    <joint name="fr3_finger_joint2" class="finger" axis="0 -1 0"/>
    {pad.format(y=-0.006, m=FINGER_MASS)}
  </body>
</body>"""


def robot_xml(robot: RobotSpec) -> str:
    """The <body> tree of the arm (fr3_link0 .. fr3_hand), built link by link from the DH rows."""
    closing: list[str] = []
    parts = ['<body name="fr3_link0">',
             f'<geom class="visual" type="cylinder" size="0.09 {robot.dh[0][1] / 2 - 0.03:.4f}" '
             f'pos="0 0 {robot.dh[0][1] / 2 - 0.03:.4f}" material="arm_white"/>',
             '<geom class="visual" type="cylinder" size="0.12 0.01" pos="0 0 0.01" '
             'material="arm_dark"/>']
    closing.append('</body>')
    for i, (a, d, alpha) in enumerate(robot.dh):
        pos = np.array([a, -math.sin(alpha) * d, math.cos(alpha) * d])
        name = robot.arm_joint_names[i]
        parts.append(f'<body name="fr3_link{i + 1}" pos="{_fmt(pos)}" '
                     f'quat="{_fmt(rot_x_quat(alpha))}">')
        parts.append(f'<joint name="{name}" axis="0 0 1" range="{robot.q_min[i]} '
                     f'{robot.q_max[i]}" armature="{ARMATURE[i]}" damping="{DAMPING[i]}"/>')
        parts.append(_arm_link_geoms(robot, i))
        closing.append('</body>')
    parts.append(f'<body name="fr3_link8" pos="0 0 {robot.flange_d}">')
    closing.append('</body>')
    parts.append(_hand_xml().replace('{hand_quat}', _fmt(rot_z_quat(robot.hand_yaw)))
                 .replace('{tcp}', f'{robot.tcp_offset}'))
    return '\n'.join(parts + closing[::-1])


def actuators_xml(robot: RobotSpec) -> str:
    motors = [f'<motor name="{n}" joint="{n}" ctrlrange="{-t} {t}" forcerange="{-t} {t}"/>'
              for n, t in zip(robot.arm_joint_names, robot.tau_max, strict=True)]
    force = robot.gripper.max_force
    fingers = [f'<position name="{n}" joint="{n}" kp="{FINGER_KP}" kv="{FINGER_KV}" '
               f'ctrlrange="0 {FINGER_TRAVEL}" forcerange="{-force} {force}"/>'
               for n in robot.finger_joint_names]
    return '<actuator>' + '\n'.join(motors + fingers) + '</actuator>'


def scene_xml(robot: RobotSpec, scene: SceneSpec = SceneSpec(), offwidth: int = 640,
              offheight: int = 480, fast_visuals: bool = True) -> str:
    """Complete MJCF: options, materials, table, cameras, robot, actuators and the task objects.

    fast_visuals: no shadow map and no shadow-casting light (MuJoCo's defaults otherwise; the
    benchmark compares both).
    """
    shadow = 0 if fast_visuals else 4096
    cast = 'false' if fast_visuals else 'true'
    samples = 0 if fast_visuals else 4
    (x0, y0), (x1, y1) = TABLE_MIN, TABLE_MAX
    table_center = _fmt([(x0 + x1) / 2, (y0 + y1) / 2, -TABLE_THICKNESS / 2])
    table_size = _fmt([(x1 - x0) / 2, (y1 - y0) / 2, TABLE_THICKNESS / 2])
    legs = ''.join(
        f'<geom class="visual" type="box" size="0.03 0.03 0.36" pos="{x} {y} -0.4" '
        f'material="table_leg"/>' for x in (x0 + 0.05, x1 - 0.05) for y in (y0 + 0.05, y1 - 0.05))
    return f"""<mujoco model="fr3_{robot.name}_scene">
<compiler angle="radian" autolimits="true" inertiafromgeom="true"/>
<option timestep="{PHYSICS_DT}" integrator="implicitfast" cone="elliptic" impratio="10"/>
<visual>
  <global offwidth="{offwidth}" offheight="{offheight}"/>
  <quality shadowsize="{shadow}" offsamples="{samples}"/>
  <headlight ambient="0.45 0.45 0.45" diffuse="0.5 0.5 0.5" specular="0 0 0"/>
</visual>
<default>
  <geom solref="0.005 1" solimp="0.95 0.99 0.001" friction="1 0.005 0.0001"/>
  <default class="visual"><geom contype="0" conaffinity="0" group="1" density="0"/></default>
  <default class="collision"><geom contype="1" conaffinity="7" group="0"/></default>
  <default class="finger">
    <joint type="slide" range="0 {FINGER_TRAVEL}" armature="0.05" damping="2"/>
    <geom contype="1" conaffinity="7" condim="4" friction="1.5 0.01 0.001" rgba="0.2 0.2 0.2 1"
          solref="0.004 1"/>
  </default>
  <default class="object">
    <geom contype="1" conaffinity="1" condim="4" friction="1 0.01 0.001"/>
  </default>
  <!-- Articulated furniture: the carcass (2) and the drawers (4) collide with the hand and the
       objects but not with each other, so a drawer never jams in its cabinet. -->
  <default class="cabinet"><geom contype="2" conaffinity="1" material="cabinet"/></default>
  <default class="drawer"><geom contype="4" conaffinity="1" material="drawer"/></default>
  <default class="handle">
    <geom contype="4" conaffinity="1" condim="4" friction="1.5 0.01 0.001"/>
  </default>
</default>
<asset>
  <texture name="floor_tex" type="2d" builtin="checker" rgb1="0.35 0.35 0.38"
           rgb2="0.3 0.3 0.33" width="64" height="64"/>
  <material name="floor" texture="floor_tex" texrepeat="8 8"/>
  <material name="table" rgba="0.62 0.5 0.38 1" specular="0"/>
  <material name="table_leg" rgba="0.35 0.28 0.2 1"/>
  <material name="arm_white" rgba="0.92 0.92 0.92 1" specular="0.1"/>
  <material name="arm_dark" rgba="0.2 0.2 0.22 1" specular="0.1"/>
  <material name="cabinet" rgba="0.72 0.66 0.56 1" specular="0"/>
  <material name="drawer" rgba="0.82 0.77 0.68 1" specular="0"/>
  {scene.assets}
</asset>
<worldbody>
  <light name="sun" directional="true" pos="0.5 0.5 2.5" dir="-0.2 -0.2 -1" castshadow="{cast}"
         diffuse="0.5 0.5 0.5"/>
  <geom name="floor" type="plane" size="3 3 0.1" pos="0 0 -0.76" material="floor"
        contype="0" conaffinity="0"/>
  <geom name="table" type="box" size="{table_size}" pos="{table_center}" material="table"
        contype="1" conaffinity="1" condim="3" friction="0.6 0.005 0.0001"/>
  {legs}
  <camera name="scene_camera" pos="{_fmt(SCENE_CAMERA_POS)}" fovy="{SCENE_CAMERA_FOVY}"
          xyaxes="{look_at_xyaxes(SCENE_CAMERA_POS, SCENE_CAMERA_TARGET)}"/>
  {robot_xml(robot)}
  {scene.worldbody}
</worldbody>
{actuators_xml(robot)}
{scene.extra}
</mujoco>"""
