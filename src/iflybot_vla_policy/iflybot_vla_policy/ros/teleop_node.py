"""`iflybot_teleop`: keyboard (and SpaceMouse) teleoperation of the end effector.

Publishes geometry_msgs/TwistStamped to MoveIt Servo's `/servo_node/delta_twist_cmds` (the
simulator accepts the same topic) while a motion key is held, after switching Servo to TWIST
through `/servo_node/switch_command_type` (ros/servo_switch.py), GripperCommand on the gripper
toggle, and calls the recorder's `~/start_episode`, `~/stop_episode` and `~/discard_episode`.
The terminal is put in cbreak mode (no echo, no line buffering) and restored on exit; without a
terminal (e.g. under a launch file) only the SpaceMouse drives.
Parameters: `SCHEMA` (a bad value fails the start naming it; docs/parameters.md).
"""
from __future__ import annotations

import os
import queue
import select
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import rclpy
from geometry_msgs.msg import TwistStamped
from iflybot_vla_msgs.msg import GripperCommand
from iflybot_vla_msgs.srv import StartEpisode, StopEpisode
from rclpy.node import Node
from std_srvs.srv import Trigger

from iflybot_vla_policy.params import Param, Schema
from iflybot_vla_policy.ros.parameters import ParameterError, load_parameters
from iflybot_vla_policy.ros.servo_switch import SERVICE as SERVO_SWITCH_SERVICE
from iflybot_vla_policy.ros.servo_switch import ServoTwistSwitch
from iflybot_vla_policy.spacemouse import SpaceMouseReader, spacemouse_twist
from iflybot_vla_policy.teleop import HELP, KeyboardTeleop, TeleopConfig

_DEFAULTS = TeleopConfig()


def _gripper_widths_ordered(values: Mapping[str, Any]) -> None:
    if not values['gripper_closed_width'] < values['gripper_open_width']:
        raise ParameterError('gripper_closed_width', f"{values['gripper_closed_width']} must be "
                             f"below gripper_open_width ({values['gripper_open_width']})")


SCHEMA = Schema('iflybot_teleop', (
    Param('twist_topic', '/servo_node/delta_twist_cmds',
          'TwistStamped command topic (MoveIt Servo or the simulator)'),
    Param('servo_switch_service', SERVO_SWITCH_SERVICE,
          "MoveIt Servo command-type service, called with TWIST before the first twist "
          "('' = do not switch)"),
    Param('gripper_topic', '/vla/gripper_command', 'GripperCommand topic'),
    Param('frame_id', 'fr3_link0', 'frame of the twist (robot base)'),
    Param('rate_hz', 30.0, 'twist publishing rate while moving', gt=0.0, le=1000.0),
    Param('linear_speed', _DEFAULTS.linear_speed, 'm/s per key', gt=0.0),
    Param('angular_speed', _DEFAULTS.angular_speed, 'rad/s per key', gt=0.0),
    Param('key_hold_s', _DEFAULTS.key_hold_s,
          'a key counts as held this long after its last repeat, s', gt=0.0),
    Param('gripper_open_width', _DEFAULTS.gripper_open_width, 'opening width of the toggle, m',
          gt=0.0),
    Param('gripper_closed_width', _DEFAULTS.gripper_closed_width,
          'closing width of the toggle, m', ge=0.0),
    Param('gripper_force', 30.0, 'grasp force in N when closing', ge=0.0),
    Param('recorder', '/iflybot_recorder', 'recorder node name (its episode services)'),
    Param('task', 'teleop', 'task name stored with each episode'),
    Param('instruction', '', 'instruction stored with each episode'),
    Param('operator_name', 'operator', 'who is teleoperating'),
    Param('spacemouse', 'auto',
          "'auto' (use one if plugged in), 'on' (fail without one) or 'off'",
          choices=('auto', 'on', 'off')),
), checks=(_gripper_widths_ordered,))


class TeleopNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__('iflybot_teleop', **kwargs)
        p = load_parameters(self, SCHEMA)
        self.teleop = KeyboardTeleop(TeleopConfig(
            linear_speed=p['linear_speed'], angular_speed=p['angular_speed'],
            key_hold_s=p['key_hold_s'], gripper_open_width=p['gripper_open_width'],
            gripper_closed_width=p['gripper_closed_width']))
        self.frame_id = p['frame_id']
        self.gripper_force = p['gripper_force']
        self.task, self.instruction = p['task'], p['instruction']
        self.operator_name = p['operator_name']
        self.twist_pub = self.create_publisher(TwistStamped, p['twist_topic'], 10)
        # MoveIt Servo starts in JOINT_JOG and ignores twists until switched to TWIST.
        self.servo_switch = (ServoTwistSwitch(self, p['servo_switch_service'])
                             if p['servo_switch_service'] else None)
        self.gripper_pub = self.create_publisher(GripperCommand, p['gripper_topic'], 10)
        recorder = p['recorder'].rstrip('/')
        self.start_client = self.create_client(StartEpisode, f'{recorder}/start_episode')
        self.stop_client = self.create_client(StopEpisode, f'{recorder}/stop_episode')
        self.discard_client = self.create_client(Trigger, f'{recorder}/discard_episode')
        self.keys: queue.Queue[str] = queue.Queue()
        self.quit_requested = threading.Event()
        self.messages: list[str] = []      # status lines (also printed)
        self._moving = False
        mode = p['spacemouse']
        self.spacemouse = SpaceMouseReader() if mode != 'off' else None
        if self.spacemouse is not None and not self.spacemouse.available:
            if mode == 'on':
                raise RuntimeError('spacemouse:=on but no 3Dconnexion device is readable '
                                   '(/dev/hidraw* permissions? pyspacemouse not installed?)')
            self.spacemouse = None
        if self.spacemouse is not None:
            self.say(f'SpaceMouse: {self.spacemouse.source}')
        self.create_timer(1.0 / p['rate_hz'], self._tick)

    def say(self, text: str) -> None:
        self.messages.append(text)
        print(text.replace('\n', '\r\n'), end='\r\n', flush=True)

    def _tick(self) -> None:
        now = time.monotonic()
        while True:
            try:
                key = self.keys.get_nowait()
            except queue.Empty:
                break
            self._on_event(self.teleop.press(key, now))
        linear, angular = self.teleop.twist(now)
        if self.spacemouse is not None:
            sl, sa = spacemouse_twist(self.spacemouse.state, self.teleop.config,
                                      self.teleop.scale)
            linear, angular = linear + sl, angular + sa
        moving = bool(linear.any() or angular.any())
        if moving and self.servo_switch is not None:
            self.servo_switch.ensure()
        if moving or self._moving:     # one zero twist after motion stops
            msg = TwistStamped()
            msg.header.stamp = self.get_clock().now().to_msg()
            msg.header.frame_id = self.frame_id
            msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = map(float, linear)
            msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = map(float, angular)
            self.twist_pub.publish(msg)
        self._moving = moving

    def _on_event(self, event: str | None) -> None:
        if event is None:
            return
        if event == 'toggle_gripper':
            closing = not self.teleop.gripper_open
            msg = GripperCommand(width=self.teleop.gripper_width, speed=0.1,
                                 force=self.gripper_force, grasp=closing)
            msg.header.stamp = self.get_clock().now().to_msg()
            self.gripper_pub.publish(msg)
            self.say('gripper: ' + ('close' if closing else 'open'))
        elif event in ('faster', 'slower'):
            self.say(f'speed x{self.teleop.scale:.2f}')
        elif event == 'help':
            self.say(HELP)
        elif event == 'quit':
            self.quit_requested.set()
        elif event == 'start':
            req = StartEpisode.Request(instruction=self.instruction, task=self.task,
                                       operator_name=self.operator_name)
            self._call(self.start_client, req, 'start episode')
        elif event in ('stop_success', 'stop_failure'):
            req = StopEpisode.Request(success=event == 'stop_success', notes='teleop')
            self._call(self.stop_client, req, 'stop episode')
        elif event == 'discard':
            self._call(self.discard_client, Trigger.Request(), 'discard episode')

    def _call(self, client: Any, request: Any, what: str) -> None:
        if not client.service_is_ready():
            self.say(f'{what}: recorder service {client.srv_name} is not available')
            return
        future = client.call_async(request)
        future.add_done_callback(
            lambda f: self.say(f'{what}: {f.result().message}' if f.result() is not None
                               else f'{what}: failed ({f.exception()})'))


class CbreakTerminal:
    """Context manager: stdin in cbreak mode (keys arrive at once, no echo), restored on exit."""

    def __init__(self, stream: Any = sys.stdin) -> None:
        self.fd = stream.fileno()
        self._saved: Any = None

    def __enter__(self) -> CbreakTerminal:
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)
        return self

    def __exit__(self, *_: object) -> None:
        import termios

        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def read_keys(fd: int, out: queue.Queue[str], stop: threading.Event) -> None:
    """Push single characters from `fd` onto `out` until `stop`; escape sequences are dropped."""
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        data = os.read(fd, 32).decode(errors='ignore')
        if not data:
            return
        if data.startswith('\x1b') and len(data) > 1:
            continue             # arrow keys and other escape sequences
        for ch in data:
            out.put(ch)


def main(args: list[str] | None = None) -> int:
    from rclpy.executors import ExternalShutdownException

    rclpy.init(args=args)
    try:
        node = TeleopNode()
    except ParameterError:      # the node logged which parameter
        rclpy.try_shutdown()
        return 1
    stop = threading.Event()
    interactive = sys.stdin.isatty()
    node.say(HELP if interactive else 'iflybot_teleop: stdin is not a terminal; keyboard off')
    terminal = CbreakTerminal() if interactive else None
    try:
        if terminal is not None:
            terminal.__enter__()
            threading.Thread(target=read_keys, args=(sys.stdin.fileno(), node.keys, stop),
                             daemon=True).start()
        while rclpy.ok() and not node.quit_requested.is_set():
            rclpy.spin_once(node, timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        stop.set()
        if terminal is not None:
            terminal.__exit__()
        if node.spacemouse is not None:
            node.spacemouse.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
