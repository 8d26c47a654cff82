"""Benchmark of the policy node over real DDS, with `tiny` (random weights) on CPU.

- image conversion: our `image_to_rgb` (bgr8, padded rows) vs a per-pixel Python loop;
- end-to-end latency, camera image stamp -> JointTrajectory publish, p50/p99, next to the bare
  `policy.infer` time in the same run (the difference is what the node adds);
- control-timer jitter p99 while inference runs back to back vs with no inference (same node);
- resident memory at the start and end of the loaded phase (flat = no leak).

In-process: a feeder node publishes 320x240 bgr8 images at 15 Hz and joint states at 100 Hz
with wall-clock stamps; the policy node runs on a MultiThreadedExecutor like `iflybot_policy`.
"""
from __future__ import annotations

import os
import random
import threading
import time

import numpy as np


def _percentiles(values: list[float] | np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return {'n': 0}
    return {'p50': float(np.percentile(values, 50)), 'p99': float(np.percentile(values, 99)),
            'max': float(values.max()), 'n': int(len(values))}


def _rss_mb() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024.0
    return float('nan')


def bench_image_conversion(quick: bool) -> dict:
    """ms per frame: ours vs a naive per-pixel loop, on the same padded bgr8 message."""
    from iflybot_vla_policy.ros.conversions import image_to_rgb, rgb_to_image

    height, width = (120, 160) if quick else (240, 320)
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    msg = rgb_to_image(rgb, 'bgr8', step=width * 3 + 8)

    def naive(m: object) -> np.ndarray:
        out = np.empty((m.height, m.width, 3), dtype=np.uint8)
        data = bytes(m.data)
        for y in range(m.height):
            row = y * m.step
            for x in range(m.width):
                i = row + 3 * x
                out[y, x, 0], out[y, x, 1], out[y, x, 2] = data[i + 2], data[i + 1], data[i]
        return out

    assert np.array_equal(naive(msg), image_to_rgb(msg, use_cv_bridge=False))
    reps = 20 if quick else 100
    start = time.perf_counter()
    for _ in range(reps):
        image_to_rgb(msg, use_cv_bridge=False)
    ours = (time.perf_counter() - start) / reps * 1e3
    naive_reps = 1 if quick else 3
    start = time.perf_counter()
    for _ in range(naive_reps):
        naive(msg)
    loop = (time.perf_counter() - start) / naive_reps * 1e3
    return {'image': f'{width}x{height} bgr8, padded rows', 'ours_ms': ours,
            'naive_loop_ms': loop, 'speedup': loop / ours}


def bench_node(quick: bool) -> dict:
    """Latency, timer jitter (idle vs loaded) and memory of the node with tiny on CPU."""
    os.environ.setdefault('ROS_DOMAIN_ID', str(random.randint(140, 230)))
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String

    from iflybot_vla_policy.policy import Policy
    from iflybot_vla_policy.robot import load_robot
    from iflybot_vla_policy.ros.conversions import rgb_to_image
    from iflybot_vla_policy.ros.policy_node import PolicyNode

    robot = load_robot()
    control_rate = 50.0
    idle_s, load_s = (8.0, 20.0) if quick else (30.0, 600.0)
    policy = Policy.from_config('tiny', seed=0)
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    state = np.append(robot.home, 0.04).astype(np.float32)
    obs = {'images': {'scene_camera': image, 'wrist_camera': image}, 'state': state,
           'instruction': 'pick up the red block'}
    policy.infer(obs)
    bare = []
    for _ in range(5 if quick else 30):
        start = time.perf_counter()
        policy.infer(obs)
        bare.append((time.perf_counter() - start) * 1e3)

    context = rclpy.Context()
    rclpy.init(context=context)
    params = [Parameter('control_rate_hz', value=control_rate),
              Parameter('inference_rate_hz', value=control_rate),   # back to back
              Parameter('max_tracking_error', value=10.0),          # joint states are static
              Parameter('warmup_inferences', value=1)]
    node = PolicyNode(policy_factory=lambda cfg: policy, context=context,
                      parameter_overrides=params)
    feeder = rclpy.create_node('bench_feeder', context=context)
    js_pub = feeder.create_publisher(JointState, '/joint_states', 10)
    image_pubs = [feeder.create_publisher(Image, f'/{c}/color/image_raw', 2)
                  for c in ('scene_camera', 'wrist_camera')]
    instruction_pub = feeder.create_publisher(String, '/vla/instruction', 10)
    names = list(robot.arm_joint_names) + list(robot.finger_joint_names)

    def publish_joints() -> None:
        msg = JointState(name=names, position=list(robot.home) + [0.02, 0.02])
        msg.header.stamp = feeder.get_clock().now().to_msg()
        js_pub.publish(msg)

    def publish_images() -> None:
        stamp = feeder.get_clock().now().to_msg()
        for pub in image_pubs:
            pub.publish(rgb_to_image(image, 'bgr8', stamp=stamp))

    feeder.create_timer(0.01, publish_joints)
    feeder.create_timer(1.0 / 15.0, publish_images)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    executor.add_node(node)
    executor.add_node(feeder)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        node.trigger_configure()
        deadline = time.monotonic() + 30
        while node._q_measured is None and time.monotonic() < deadline:
            time.sleep(0.05)
        node.trigger_activate()   # no instruction yet: active but no inference
        time.sleep(idle_s)
        idle_ticks = np.asarray(node.tick_times)
        rss_start = _rss_mb()
        instruction_pub.publish(String(data='pick up the red block'))
        node.e2e_latency_ms.clear()
        node.inference_ms.clear()
        e2e: list[float] = []
        infer: list[float] = []
        loaded_ticks: list[np.ndarray] = []
        rss_trace = [rss_start]                   # every 10 s of the loaded phase
        t_load = time.monotonic()
        while time.monotonic() - t_load < load_s:
            time.sleep(min(10.0, load_s))
            rss_trace.append(_rss_mb())
            e2e += list(node.e2e_latency_ms)
            infer += list(node.inference_ms)
            node.e2e_latency_ms.clear()
            node.inference_ms.clear()
            ticks = np.asarray(node.tick_times)
            loaded_ticks.append(ticks[ticks > t_load + 1.0])
        rss_end = _rss_mb()
        chunks = node.status().chunks_produced
    finally:
        node.trigger_deactivate()
        node.trigger_cleanup()   # joins the inference worker (a thread inside torch at exit
        executor.shutdown(timeout_sec=5)   # aborts the interpreter)
        thread.join(timeout=5)   # a spin thread alive at exit aborts the interpreter
        node.destroy_node()
        feeder.destroy_node()
        rclpy.shutdown(context=context)

    def jitter(ticks: np.ndarray) -> dict:
        periods = np.diff(np.unique(ticks))
        return {**_percentiles(np.abs(periods - 1.0 / control_rate) * 1e3),
                'rate_hz': float(1.0 / periods.mean()) if len(periods) else 0.0}

    loaded = np.concatenate(loaded_ticks) if loaded_ticks else np.zeros(0)
    return {'model': 'tiny (random weights), CPU', 'control_rate_hz': control_rate,
            'load_seconds': load_s, 'chunks': int(chunks),
            'bare_infer_ms': _percentiles(bare), 'node_inference_ms': _percentiles(infer),
            'e2e_image_stamp_to_trajectory_ms': _percentiles(e2e),
            'timer_jitter_ms_idle': jitter(idle_ticks),
            'timer_jitter_ms_under_inference': jitter(loaded),
            'rss_mb_start': rss_start, 'rss_mb_end': rss_end,
            # growth after the first minute (allocator warm-up excluded): ~0 when flat
            'rss_mb_growth_after_1min': rss_end - rss_trace[min(6, len(rss_trace) - 1)],
            'rss_mb_trace_10s': [round(x, 1) for x in rss_trace]}


def run(quick: bool = False) -> dict:
    return {'image_conversion': bench_image_conversion(quick), 'node': bench_node(quick)}


if __name__ == '__main__':
    import json
    import sys
    print(json.dumps(run(quick='--full' not in sys.argv), indent=2))
