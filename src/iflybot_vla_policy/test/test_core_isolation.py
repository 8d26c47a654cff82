"""The core is a plain Python library: importing it never pulls in rclpy or ROS messages."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
import iflybot_vla_policy
failed = []
for info in pkgutil.walk_packages(iflybot_vla_policy.__path__, 'iflybot_vla_policy.'):
    if info.name.startswith('iflybot_vla_policy.ros'):
        continue
    importlib.import_module(info.name)
ros = sorted(m for m in sys.modules if m == 'rclpy' or m.startswith('rclpy.')
             or m.endswith('_msgs') or '_msgs.' in m)
print('ROS:' + ','.join(ros))
"""


def test_importing_every_core_module_does_not_import_rclpy_or_messages() -> None:
    proc = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith('ROS:')][-1]
    assert line == 'ROS:', f'core modules imported ROS modules: {line[4:]}'


def test_importing_the_package_is_cheap() -> None:
    proc = subprocess.run(
        [sys.executable, '-c', 'import sys, iflybot_vla_policy; '
         'print(sorted(m for m in ("torch", "rclpy", "mujoco") if m in sys.modules))'],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '[]'


def test_no_core_source_imports_rclpy_even_lazily() -> None:
    """Imports inside functions escape the module walk above; the source does not."""
    import re
    from pathlib import Path

    import iflybot_vla_policy

    root = Path(iflybot_vla_policy.__file__).resolve().parent
    pattern = re.compile(r'^\s*(from|import)\s+(rclpy|\w+_msgs)\b', re.MULTILINE)
    offenders = [str(p.relative_to(root)) for p in sorted(root.rglob('*.py'))
                 if 'ros' not in p.relative_to(root).parts[:1]
                 and pattern.search(p.read_text())]
    assert offenders == [], f'core modules importing ROS (move them under ros/): {offenders}'


def test_no_library_module_imports_a_command() -> None:
    """CLI commands (`*_cmd.py`, cli.py) sit on top: what they share lives in the library."""
    import re
    from pathlib import Path

    import iflybot_vla_policy

    root = Path(iflybot_vla_policy.__file__).resolve().parent
    pattern = re.compile(r'^\s*(from\s+iflybot_vla_policy(\.\w+)*\.\w+_cmd\s+import'
                         r'|from\s+iflybot_vla_policy\s+import\s+.*\b\w+_cmd\b'
                         r'|import\s+iflybot_vla_policy(\.\w+)*\.\w+_cmd\b)', re.MULTILINE)
    offenders = [str(p.relative_to(root)) for p in sorted(root.rglob('*.py'))
                 if not p.name.endswith('_cmd.py') and p.name != 'cli.py'
                 and pattern.search(p.read_text())]
    assert offenders == [], f'library modules importing a command module: {offenders}'
