"""MoveIt Servo's command type: it starts in JOINT_JOG and ignores twists until switched to TWIST.

Clients that stream TwistStamped (teleop, the policy node in ee_delta mode) call
`ServoTwistSwitch.ensure()` before each twist: it asks `/servo_node/switch_command_type` once,
without blocking, and says in the log what happened. The service type is moveit_msgs' where it
is importable (a full ROS install, the Docker image); with the PyPI wheels it is the identical
iflybot_vla_msgs/ServoCommandType, which only the simulator's Servo stand-in offers.
"""
from __future__ import annotations

import time
from typing import Any

from rclpy.node import Node

SERVICE = '/servo_node/switch_command_type'
RETRY_S = 1.0      # between attempts while the service is missing or refuses


def servo_command_type() -> tuple[Any, str]:
    """(the ServoCommandType service class, its full name): moveit_msgs' when installed."""
    try:
        from moveit_msgs.srv import ServoCommandType
        return ServoCommandType, 'moveit_msgs/srv/ServoCommandType'
    except ImportError:
        from iflybot_vla_msgs.srv import ServoCommandType
        return ServoCommandType, 'iflybot_vla_msgs/srv/ServoCommandType'


class ServoTwistSwitch:
    """Switches Servo to TWIST the first time a client is about to command it."""

    def __init__(self, node: Node, service: str = SERVICE) -> None:
        self._node = node
        self._service = service
        self._srv, self.type_name = servo_command_type()
        self.client = node.create_client(self._srv, service)
        self.switched = False
        self._pending: Any = None
        self._next_try = 0.0
        self._said_missing = False
        if not self.type_name.startswith('moveit_msgs'):
            node.get_logger().warning(
                f'moveit_msgs is not importable: Servo switching uses {self.type_name}, which '
                f'only the iflybot simulator offers; a real MoveIt Servo would ignore twists '
                f'(install moveit_msgs, as the Docker image does)')

    def destroy(self) -> None:
        """Remove the service client from the node (lifecycle cleanup)."""
        self._node.destroy_client(self.client)

    def ensure(self) -> bool:
        """True once Servo accepted TWIST; otherwise starts or polls one request (no blocking)."""
        if self.switched:
            return True
        log = self._node.get_logger()
        if self._pending is not None:
            if not self._pending.done():
                return False
            result = self._pending.result()
            self._pending = None
            if result is not None and result.success:
                self.switched = True
                log.info(f'Servo switched to TWIST through {self._service} ({self.type_name})')
                return True
            log.warning(f'{self._service} refused TWIST; retrying in {RETRY_S:.0f} s')
            self._next_try = time.monotonic() + RETRY_S
            return False
        if time.monotonic() < self._next_try:
            return False
        if not self.client.service_is_ready():
            if not self._said_missing:
                log.warning(f'no service {self._service} ({self.type_name}): MoveIt Servo '
                            f'starts in JOINT_JOG and ignores twists until it is switched; '
                            f'retrying every {RETRY_S:.0f} s')
                self._said_missing = True
            self._next_try = time.monotonic() + RETRY_S
            return False
        request = self._srv.Request()
        request.command_type = self._srv.Request.TWIST
        self._pending = self.client.call_async(request)
        return False
