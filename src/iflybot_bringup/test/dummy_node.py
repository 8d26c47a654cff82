"""A real rclpy node for runner tests; installed by conftest.py into a temporary ament prefix.

It writes a JSON report (its name, namespace, parameters, a remapped topic, lifecycle events,
how it ended) to the file given by the `report` parameter, so tests can check what the runner
passed on its command line and how it shut the node down.
"""
from __future__ import annotations

import json
import signal
import sys
import time

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node

PARAMS = {'report': '', 'label': '', 'flag': False, 'count': 0, 'ratio': 0.0,
          'values': [0.0], 'exit_after': 0.0, 'exit_code': 0, 'fail_configure': False,
          'ignore_sigint': False, 'shutdown_delay': 0.0}


class Dummy:
    """Parameters, report and lifecycle callbacks shared by the plain and the lifecycle node."""

    def setup(self) -> None:
        self.values = {k: self.declare_parameter(k, v).value for k, v in PARAMS.items()}
        self.report = {
            'name': self.get_name(), 'namespace': self.get_namespace(),
            'params': {k: (v if isinstance(v, (str, bool, int, float)) else list(v))
                       for k, v in self.values.items()},
            'chatter': self.resolve_topic_name('chatter'), 'events': []}

    def event(self, text: str) -> None:
        self.report['events'].append(text)
        if self.values['report']:
            with open(self.values['report'], 'w') as f:
                json.dump(self.report, f)

    def on_configure(self, _state: object) -> TransitionCallbackReturn:
        self.event('configure')
        if self.values['fail_configure']:
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, _state: object) -> TransitionCallbackReturn:
        self.event('activate')
        return TransitionCallbackReturn.SUCCESS


class PlainDummy(Dummy, Node):
    def __init__(self) -> None:
        Node.__init__(self, 'dummy')
        self.setup()


class LifecycleDummy(Dummy, LifecycleNode):
    def __init__(self) -> None:
        LifecycleNode.__init__(self, 'dummy')
        self.setup()


def main() -> int:
    rclpy.init(args=sys.argv)
    args = rclpy.utilities.remove_ros_args(sys.argv)
    node = LifecycleDummy() if '--lifecycle' in args else PlainDummy()
    values = node.values
    if values['ignore_sigint']:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline = time.monotonic() + values['exit_after'] if values['exit_after'] > 0 else None
    try:
        node.get_logger().info(f'started; label {values["label"]!r}')
        node.event('started')
        while rclpy.ok():
            rclpy.spin_once(node, timeout_sec=0.05)
            if deadline is not None and time.monotonic() > deadline:
                node.event(f'exit {values["exit_code"]}')
                return int(values['exit_code'])
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    time.sleep(values['shutdown_delay'])   # e.g. a recorder finalising its bag
    node.event('clean shutdown')
    return 0


if __name__ == '__main__':
    sys.exit(main())
