"""Teleoperation logic without ROS: keys and SpaceMouse reports -> end-effector twists and events.

The keyboard node feeds key presses with their time; `twist(now)` is the command to publish at
that time: a key counts as held until `key_hold_s` after its last press (terminals repeat held
keys), so holding `w` moves the TCP forward and releasing it stops within `key_hold_s`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# key -> (linear (3,), angular (3,)) unit direction in the base frame
MOTION_KEYS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    'w': ((1, 0, 0), (0, 0, 0)), 's': ((-1, 0, 0), (0, 0, 0)),
    'a': ((0, 1, 0), (0, 0, 0)), 'd': ((0, -1, 0), (0, 0, 0)),
    'q': ((0, 0, 1), (0, 0, 0)), 'e': ((0, 0, -1), (0, 0, 0)),
    'u': ((0, 0, 0), (1, 0, 0)), 'o': ((0, 0, 0), (-1, 0, 0)),
    'i': ((0, 0, 0), (0, 1, 0)), 'k': ((0, 0, 0), (0, -1, 0)),
    'j': ((0, 0, 0), (0, 0, 1)), 'l': ((0, 0, 0), (0, 0, -1)),
}
EVENT_KEYS = {' ': 'toggle_gripper', '1': 'start', '2': 'stop_success', '3': 'stop_failure',
              '0': 'discard', '+': 'faster', '=': 'faster', '-': 'slower', 'h': 'help',
              '\x1b': 'quit', '\x03': 'quit'}

HELP = """\
iflybot teleop: move the TCP (base frame)
  w/s  +x/-x    a/d  +y/-y    q/e  up/down
  u/o  roll     i/k  pitch    j/l  yaw
  space  open/close the gripper     +/-  faster/slower
  1 start episode   2 stop (success)   3 stop (failure)   0 discard episode
  h help   Esc or Ctrl-C quit"""


@dataclass(frozen=True)
class TeleopConfig:
    linear_speed: float = 0.1      # m/s at scale 1
    angular_speed: float = 0.5     # rad/s at scale 1
    key_hold_s: float = 0.15
    gripper_open_width: float = 0.08
    gripper_closed_width: float = 0.0
    max_linear_speed: float = 0.5  # clamp after scaling (m/s)
    max_angular_speed: float = 2.0

    def __post_init__(self) -> None:
        for name in ('linear_speed', 'angular_speed', 'key_hold_s', 'max_linear_speed',
                     'max_angular_speed'):
            if getattr(self, name) <= 0:
                raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
        if not 0 <= self.gripper_closed_width < self.gripper_open_width:
            raise ValueError('need 0 <= gripper_closed_width < gripper_open_width')


@dataclass
class KeyboardTeleop:
    config: TeleopConfig = field(default_factory=TeleopConfig)
    scale: float = 1.0
    gripper_open: bool = True
    _last_press: dict[str, float] = field(default_factory=dict)

    def press(self, key: str, now: float) -> str | None:
        """Register one key event; returns an event name ('toggle_gripper', 'start', ...)."""
        key = key.lower() if len(key) == 1 and key.isalpha() else key
        if key in MOTION_KEYS:
            self._last_press[key] = now
            return None
        event = EVENT_KEYS.get(key)
        if event == 'toggle_gripper':
            self.gripper_open = not self.gripper_open
        elif event == 'faster':
            self.scale = min(self.scale * 1.5, 8.0)
        elif event == 'slower':
            self.scale = max(self.scale / 1.5, 0.1)
        return event

    @property
    def gripper_width(self) -> float:
        c = self.config
        return c.gripper_open_width if self.gripper_open else c.gripper_closed_width

    def active_keys(self, now: float) -> list[str]:
        return sorted(k for k, t in self._last_press.items() if now - t <= self.config.key_hold_s)

    def twist(self, now: float) -> tuple[np.ndarray, np.ndarray]:
        """Linear (3,) m/s and angular (3,) rad/s to command at time `now`."""
        linear, angular = np.zeros(3), np.zeros(3)
        for key in self.active_keys(now):
            lin, ang = MOTION_KEYS[key]
            linear += lin
            angular += ang
        c = self.config
        linear = clamp_norm(linear * c.linear_speed * self.scale, c.max_linear_speed)
        angular = clamp_norm(angular * c.angular_speed * self.scale, c.max_angular_speed)
        return linear, angular


def clamp_norm(v: np.ndarray, limit: float) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v * (limit / n) if n > limit else v
