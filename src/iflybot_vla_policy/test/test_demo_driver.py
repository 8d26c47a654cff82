"""The demo / through-ROS driver over real DDS: what it taps from /vla/status per episode."""
from __future__ import annotations

import threading

import numpy as np
import pytest

rclpy = pytest.importorskip('rclpy')

from iflybot_vla_msgs.msg import PolicyStatus  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402

from iflybot_vla_policy.eval.through_ros import _episode_result  # noqa: E402
from iflybot_vla_policy.robot import load_robot  # noqa: E402
from iflybot_vla_policy.ros.demo_driver import DemoDriver  # noqa: E402

pytestmark = pytest.mark.ros
HOLD, RUNNING, ERROR = (PolicyStatus.STATE_HOLD, PolicyStatus.STATE_RUNNING,
                        PolicyStatus.STATE_ERROR)
STALE = 'stale input: joint_states: 0.31 s old (timeout 0.25 s)'


def test_holds_during_a_run_are_counted_by_cause_and_idle_holds_are_not(ros_context, wait):
    driver = DemoDriver(frame_every=10**9, context=ros_context)
    tap = rclpy.create_node('demo_driver_test', context=ros_context)
    pub = tap.create_publisher(PolicyStatus, '/vla/status', 10)
    executor = MultiThreadedExecutor(num_threads=2, context=ros_context)
    executor.add_node(driver)
    executor.add_node(tap)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        assert wait(lambda: pub.get_subscription_count() > 0, timeout=10)
        before = driver.counts()
        sent = [(HOLD, 'waiting for an instruction'), (RUNNING, ''), (HOLD, STALE),
                (HOLD, STALE),                                   # the same hold, 5 Hz repeats
                (RUNNING, ''), (HOLD, STALE.replace('0.31', '0.45')),
                (ERROR, 'fr3_joint6 is 0.998 rad from its command'),
                (HOLD, 'run_policy ended: error: fr3_joint6 is 0.998 rad from its command')]
        for state, error in sent:
            pub.publish(PolicyStatus(state=state, last_error=error))
            assert wait(lambda e=error: driver._latest_status is not None
                        and driver._latest_status.last_error == e, timeout=10)
        after = driver.counts()
        assert driver.taps.holds[before['holds']:after['holds']] == [
            STALE, STALE.replace('0.31', '0.45'), 'fr3_joint6 is 0.998 rad from its command']
        result = _episode_result(driver.taps, before, after, load_robot(), 'pick_place', 1,
                                 'pick', False, 25.0)
        assert result.hold_reasons == {
            'stale input: joint_states: N s old (timeout N s)': 2,
            'frN_jointN is N rad from its command': 1}
    finally:
        executor.shutdown(timeout_sec=5)
        thread.join(timeout=5)
        driver.destroy_node()
        tap.destroy_node()


def test_joint_states_from_before_the_reset_do_not_count_in_the_episode():
    """A reset's reply can overtake the old scene's last joint states: their jump to the new
    pose is not the policy's motion (it made RMS jerk ~10^4 instead of ~10^2)."""
    from iflybot_vla_policy.ros.demo_driver import Taps

    robot = load_robot()
    taps = Taps()
    t = np.arange(0.0, 4.0, 0.02)
    q = np.tile(robot.home, (len(t), 1)) + 0.05 * np.sin(t)[:, None]
    q[t < 1.0] += 0.4                       # the old scene, stamped before the reset at 1 s
    taps.measured_t, taps.measured_q = list(t), list(q)
    before = dict.fromkeys(('measured', 'commanded', 'arrivals', 'latency', 'holds', 'status'), 0)
    after = {**before, 'measured': len(t)}
    args = (taps, before, after, robot, 'pick_place', 1, 'pick', True, 3.0)
    assert _episode_result(*args).rms_jerk > 1e3
    assert _episode_result(*args, start=1.0).rms_jerk < 1.0


def test_an_episode_reports_the_worst_control_timing_the_policy_published():
    from iflybot_vla_policy.ros.demo_driver import Taps

    taps = Taps(status_timing=[(50.0, 1.0, 40.0), (46.0, 4.0, 55.0), (49.5, 2.0, 45.0)])
    before = dict.fromkeys(('measured', 'commanded', 'arrivals', 'latency', 'holds', 'status'), 0)
    result = _episode_result(taps, before, {**before, 'status': 3}, load_robot(), 'pick_place',
                             1, 'pick', True, 3.0)
    assert (result.control_rate_hz_min, result.timer_jitter_p99_ms,
            result.e2e_latency_p99_ms) == (46.0, 4.0, 55.0)
