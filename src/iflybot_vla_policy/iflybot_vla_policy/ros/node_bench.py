"""Benchmark of the policy node over real DDS, in the deployment shape, with `tiny` on CPU.

- image conversion: our `image_to_rgb` (bgr8, padded rows) vs a per-pixel Python loop;
- the node as deployed: the policy node in its own process, a feeder process publishing
  320x240 bgr8 images of two cameras at 15 Hz and joint states at 100 Hz (wall-clock stamps),
  and this process listening. Reported per executor layout, side by side in one run: the
  single-threaded executor `iflybot_policy` runs, and the MultiThreadedExecutor(4) it ran before.
  The model runs in a child process (the node's default) or on a thread of the node.
  Control rate, timer jitter p99 and missed ticks (from /vla/status, idle and while inference
  runs back to back), image-stamp-to-trajectory latency (/vla/action_chunk arrival minus its
  observation stamp), inference time in the node next to the bare `policy.infer` time, CPU and
  resident memory of the node process.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import time

import numpy as np

CAMERAS = ('scene_camera', 'wrist_camera')
CONTROL_RATE_HZ = 50.0
INSTRUCTION = 'pick up the red block'
# executor, model in a child process: ours, ours with the model on a thread, and before
LAYOUTS = {'single_executor_inference_process': ('single', True),
           'single_executor_inference_thread': ('single', False),
           'multi_executor_inference_thread (before)': ('multi', False)}


def _percentiles(values: list[float] | np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return {'n': 0}
    return {'p50': float(np.percentile(values, 50)), 'p99': float(np.percentile(values, 99)),
            'max': float(values.max()), 'n': int(len(values))}


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


# ------------------------------------------------------------------------- child processes
def _feeder(stop: multiprocessing.synchronize.Event) -> None:
    """Joint states at 100 Hz and two 320x240 bgr8 cameras at 15 Hz, wall-clock stamps."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image, JointState

    from iflybot_vla_policy.robot import load_robot
    from iflybot_vla_policy.ros.conversions import rgb_to_image

    robot = load_robot()
    rclpy.init()
    node = rclpy.create_node('bench_feeder')
    joints = node.create_publisher(JointState, '/joint_states', 10)
    cameras = [node.create_publisher(Image, f'/{c}/color/image_raw', 2) for c in CAMERAS]
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    names = list(robot.arm_joint_names) + list(robot.finger_joint_names)
    position = list(robot.home) + [0.02, 0.02]

    def publish_joints() -> None:
        msg = JointState(name=names, position=position)
        msg.header.stamp = node.get_clock().now().to_msg()
        joints.publish(msg)

    def publish_images() -> None:
        stamp = node.get_clock().now().to_msg()
        for pub in cameras:
            pub.publish(rgb_to_image(image, 'bgr8', stamp=stamp))

    node.create_timer(0.01, publish_joints)
    node.create_timer(1.0 / 15.0, publish_images)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    while not stop.is_set():
        executor.spin_once(timeout_sec=0.1)
    node.destroy_node()
    rclpy.shutdown()


def _policy_node(layout: str, in_process: bool, stop: multiprocessing.synchronize.Event) -> None:
    """The policy node as `iflybot_policy` runs it ('single'), or on the executor it used
    before ('multi'), configured and activated as `iflybot up` does."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from iflybot_vla_policy.ros.policy_node import PolicyNode

    rclpy.init()
    params = [Parameter('preset', value='tiny'), Parameter('torch_threads', value=1),
              Parameter('control_rate_hz', value=CONTROL_RATE_HZ),
              Parameter('inference_rate_hz', value=CONTROL_RATE_HZ),   # back to back
              Parameter('max_tracking_error', value=10.0),              # static joint states
              Parameter('inference_process', value=in_process)]
    node = PolicyNode(parameter_overrides=params)
    executor = SingleThreadedExecutor() if layout == 'single' else MultiThreadedExecutor(4)
    executor.add_node(node)
    node.trigger_configure()
    node.trigger_activate()
    while not stop.is_set():
        executor.spin_once(timeout_sec=0.1)
    node.shutdown()
    node.destroy_node()
    rclpy.shutdown()


# ------------------------------------------------------------------------------ measurement
def _bare_inference_ms(quick: bool) -> dict:
    import torch

    from iflybot_vla_policy.policy import Policy
    from iflybot_vla_policy.robot import load_robot

    torch.set_num_threads(1)
    robot = load_robot()
    policy = Policy.from_config('tiny', seed=0)
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    obs = {'images': dict.fromkeys(CAMERAS, image), 'instruction': INSTRUCTION,
           'state': np.append(robot.home, 0.04).astype(np.float32)}
    policy.infer(obs)
    times = []
    for _ in range(5 if quick else 30):
        start = time.perf_counter()
        policy.infer(obs)
        times.append((time.perf_counter() - start) * 1e3)
    return _percentiles(times)


def _measure_layout(layout: str, in_process: bool, quick: bool) -> dict:
    import psutil
    import rclpy
    from iflybot_vla_msgs.msg import ActionChunk, PolicyStatus
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String

    idle_s, load_s = (3.0, 5.0) if quick else (20.0, 120.0)   # quick: does it run
    spawn = multiprocessing.get_context('spawn')
    stop = spawn.Event()
    feeder = spawn.Process(target=_feeder, args=(stop,), daemon=True)
    # not a daemon: the node starts its own inference process
    policy = spawn.Process(target=_policy_node, args=(layout, in_process, stop))
    feeder.start()
    policy.start()
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node('bench_listener', context=context)
    statuses: list[tuple[float, PolicyStatus]] = []
    e2e: list[tuple[float, float]] = []
    node.create_subscription(PolicyStatus, '/vla/status',
                             lambda m: statuses.append((time.monotonic(), m)), 50)

    def on_chunk(msg: ActionChunk) -> None:
        now = node.get_clock().now().nanoseconds * 1e-9
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        e2e.append((time.monotonic(), (now - stamp) * 1e3))

    node.create_subscription(ActionChunk, '/vla/action_chunk', on_chunk, 50)
    instruction = node.create_publisher(String, '/vla/instruction', 10)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)

    def spin_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)

    try:
        deadline = time.monotonic() + 120.0
        while not statuses and time.monotonic() < deadline:   # configured and publishing
            spin_for(0.2)
        if not statuses:
            raise RuntimeError(f'{layout}: the policy node published no /vla/status in 120 s')
        proc = psutil.Process(policy.pid)
        spin_for(idle_s)
        t_load = time.monotonic()
        idle = [m for t, m in statuses if t < t_load]
        for _ in range(3):
            instruction.publish(String(data=INSTRUCTION))
            spin_for(0.3)
        spin_for(1.0)
        procs = [proc, *proc.children(recursive=True)]   # the inference process too
        for p in procs:
            p.cpu_percent()
        rss_start = sum(p.memory_info().rss for p in procs) / 2**20
        t_measure = time.monotonic()
        spin_for(load_s)
        cpu = sum(p.cpu_percent() for p in procs)
        rss_end = sum(p.memory_info().rss for p in procs) / 2**20
    finally:
        stop.set()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        for child in (policy, feeder):
            child.join(timeout=15)
            if child.is_alive():
                child.kill()
    loaded = [m for t, m in statuses if t >= t_measure + 5.0]   # windows fully under load
    if not loaded:
        loaded = [m for t, m in statuses if t >= t_measure]
    last = loaded[-1] if loaded else statuses[-1]
    first = next((m for t, m in statuses if t >= t_measure), last)

    def window(messages: list) -> dict:
        return {'control_rate_hz_p50': float(np.median([m.control_rate_hz for m in messages])),
                'control_rate_hz_min': float(min(m.control_rate_hz for m in messages)),
                'jitter_p99_ms_median': float(np.median([m.control_jitter_p99_ms
                                                         for m in messages])),
                'jitter_p99_ms_max': float(max(m.control_jitter_p99_ms for m in messages))}

    chunks = int(last.chunks_produced - first.chunks_produced)
    return {'idle': window(idle or statuses[:1]), 'under_inference': window(loaded),
            'missed_ticks_under_inference': int(last.missed_ticks - first.missed_ticks),
            'chunks_per_s': chunks / max(load_s, 1e-9),
            'node_inference_ms_p50': float(last.inference_latency_p50_ms),
            'node_inference_ms_p99': float(last.inference_latency_p99_ms),
            'e2e_image_stamp_to_chunk_ms': _percentiles([v for t, v in e2e if t >= t_measure]),
            'node_cpu_percent_with_its_inference_process': cpu,
            'rss_mb_start': rss_start, 'rss_mb_end': rss_end}


def bench_node(quick: bool) -> dict:
    """Each executor layout in turn, the same feeder and node, one run."""
    os.environ.setdefault('ROS_DOMAIN_ID', str(random.randint(140, 230)))
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    out: dict = {'model': 'tiny (random weights), CPU, torch_threads 1',
                 'shape': 'feeder, policy node and listener in three processes; 2 cameras '
                          '320x240 bgr8 at 15 Hz, joint states at 100 Hz',
                 'control_rate_hz': CONTROL_RATE_HZ, 'cores': os.cpu_count(),
                 'bare_infer_ms': _bare_inference_ms(quick)}
    for name, (layout, in_process) in LAYOUTS.items():
        out[name] = _measure_layout(layout, in_process, quick)
    ours = out[next(iter(LAYOUTS))]
    out['e2e_p99_over_bare_p50'] = (ours['e2e_image_stamp_to_chunk_ms'].get('p99', np.nan)
                                    / out['bare_infer_ms']['p50'])
    return out


def run(quick: bool = False) -> dict:
    return {'image_conversion': bench_image_conversion(quick), 'node': bench_node(quick)}


if __name__ == '__main__':
    import json
    import sys
    print(json.dumps(run(quick='--full' not in sys.argv), indent=2))
