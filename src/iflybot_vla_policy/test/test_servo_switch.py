"""Teleop switches MoveIt Servo to TWIST when it starts commanding (ros/servo_switch.py)."""
import threading
import time

import pytest


def test_teleop_switches_servo_to_twist_when_it_starts_moving(ros_context, wait):
    rclpy = pytest.importorskip('rclpy')
    from rclpy.executors import MultiThreadedExecutor

    from iflybot_vla_policy.ros.servo_switch import SERVICE, servo_command_type
    from iflybot_vla_policy.ros.teleop_node import TeleopNode

    srv, _ = servo_command_type()
    requests = []

    def on_switch(request, response):
        requests.append(request.command_type)
        response.success = True
        return response

    P = rclpy.parameter.Parameter
    teleop = TeleopNode(context=ros_context, parameter_overrides=[P('spacemouse', value='off')])
    servo = rclpy.create_node('servo_node_stand_in', context=ros_context)
    servo.create_service(srv, SERVICE, on_switch)
    executor = MultiThreadedExecutor(num_threads=2, context=ros_context)
    for n in (teleop, servo):
        executor.add_node(n)
    threading.Thread(target=executor.spin, daemon=True).start()
    try:
        assert wait(teleop.servo_switch.client.service_is_ready, timeout=10)
        time.sleep(0.3)
        assert requests == []            # no switch before anyone commands a motion
        for _ in range(5):
            teleop.keys.put('w')
            time.sleep(0.05)
        assert wait(lambda: teleop.servo_switch.switched, timeout=10)
        assert requests == [srv.Request.TWIST]
        for _ in range(5):                # once switched, it does not ask again
            teleop.keys.put('w')
            time.sleep(0.05)
        assert requests == [srv.Request.TWIST]
    finally:
        executor.shutdown()
        for n in (teleop, servo):
            n.destroy_node()


def test_missing_servo_service_is_logged_and_retried(ros_context, wait):
    rclpy = pytest.importorskip('rclpy')
    from rcl_interfaces.msg import Log
    from rclpy.executors import SingleThreadedExecutor

    from iflybot_vla_policy.ros.servo_switch import RETRY_S, ServoTwistSwitch

    node = rclpy.create_node('servo_switch_probe', context=ros_context)
    logs = []
    node.create_subscription(Log, '/rosout', lambda m: logs.append(m.msg), 50)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    try:
        switch = ServoTwistSwitch(node, '/nobody_here/switch_command_type')
        assert switch.ensure() is False
        assert wait(lambda: any('no service /nobody_here/switch_command_type' in m
                                and 'ignores twists' in m for m in logs),
                    spin=lambda: executor.spin_once(timeout_sec=0.05))
        said = len(logs)
        time.sleep(RETRY_S + 0.1)
        assert switch.ensure() is False and switch.switched is False
        executor.spin_once(timeout_sec=0.2)
        assert len(logs) == said          # said once, not at every tick
        switch.destroy()
        assert not any(c.srv_name == '/nobody_here/switch_command_type' for c in node.clients)
    finally:
        executor.shutdown()
        node.destroy_node()
