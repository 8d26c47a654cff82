"""`iflybot doctor`: checks what the stack needs on this machine, each with an actionable hint."""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ''
    required: bool = True


def _run_python(code: str, env: dict[str, str] | None = None,
                timeout: float = 60.0) -> tuple[bool, str]:
    """Run a snippet in a fresh interpreter so that a crash (e.g. a GL driver) cannot kill us."""
    try:
        proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return False, f'timed out after {timeout:.0f} s'
    out = (proc.stdout.strip() or proc.stderr.strip().splitlines()[-1:] or [''])
    text = out if isinstance(out, str) else ' '.join(out)
    return proc.returncode == 0, text


def check_rclpy() -> Check:
    ok, out = _run_python(
        'import rclpy; from rclpy.utilities import get_rmw_implementation_identifier as g; '
        'rclpy.init(); n = rclpy.create_node("iflybot_doctor"); print(g()); '
        'n.destroy_node(); rclpy.shutdown()')
    return Check('rclpy + RMW', ok, out,
                 'run `make setup`, then `source env.sh` (the ROS 2 wheels live in .venv)')


def check_interfaces() -> Check:
    ok, out = _run_python(
        'from iflybot_vla_msgs.msg import ActionChunk; from iflybot_vla_msgs.srv import '
        'StartEpisode; from iflybot_vla_msgs.action import RunPolicy; print("ActionChunk, '
        'StartEpisode, RunPolicy importable")')
    return Check('iflybot_vla_msgs', ok, out,
                 'build the workspace with `make setup` and `source env.sh` (needs both '
                 'PYTHONPATH and LD_LIBRARY_PATH of install/)')


def check_torch() -> Check:
    ok, out = _run_python(
        'import torch; dev = "cuda" if torch.cuda.is_available() else "cpu"; '
        'print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}")')
    return Check('torch', ok, out, 'pip install -r requirements.txt (torch==2.13.0)')


def check_mujoco() -> Check:
    results = []
    for backend in ('egl', 'osmesa'):
        ok, out = _run_python(
            'import mujoco; m = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom '
            'size=\'.1\'/></worldbody></mujoco>"); r = mujoco.Renderer(m, 64, 64); '
            'r.update_scene(mujoco.MjData(m)); r.render(); print("ok")',
            env={'MUJOCO_GL': backend, 'PYOPENGL_PLATFORM': backend})
        results.append((backend, ok, out))
    working = [b for b, ok, _ in results if ok]
    detail = ', '.join(f'{b}: {"ok" if ok else out}' for b, ok, out in results)
    return Check('MuJoCo offscreen rendering', bool(working), detail,
                 'apt-get install -y libegl1 libgl1 libosmesa6; choose with MUJOCO_GL=egl|osmesa')


def check_ros2_launch() -> Check:
    has_cli = shutil.which('ros2') is not None
    has_launch = importlib.util.find_spec('launch_ros') is not None
    ok = has_cli and has_launch
    detail = f'ros2 CLI {"found" if has_cli else "absent"}, launch_ros ' \
             f'{"importable" if has_launch else "absent"}'
    return Check('ros2 launch', ok, detail,
                 'optional: without it `iflybot up GRAPH` starts the same node graphs; for '
                 '`ros2 launch`, franka_ros2 and MoveIt use the image in docker/',
                 required=False)


def check_disk(path: str = '.') -> Check:
    free_gb = shutil.disk_usage(path).free / 1e9
    return Check('disk space', free_gb >= 5.0, f'{free_gb:.1f} GB free in {os.path.abspath(path)}',
                 'recording bags and training need several GB: free some space')


CHECKS = (check_rclpy, check_interfaces, check_torch, check_mujoco, check_ros2_launch, check_disk)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--strict', action='store_true',
                        help='exit non-zero when an optional check fails too')


def run(args: argparse.Namespace) -> int:
    failed = 0
    for check_fn in CHECKS:
        check = check_fn()
        mark = 'ok  ' if check.ok else ('FAIL' if check.required else 'warn')
        print(f'[{mark}] {check.name}: {check.detail}')
        if not check.ok:
            print(f'       hint: {check.hint}')
            failed += check.required or args.strict
    print('all required checks passed' if not failed else f'{failed} check(s) failed')
    return 1 if failed else 0
