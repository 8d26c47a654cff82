"""`make setup` explains a bad environment in one line instead of failing with a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

SETUP = REPO_ROOT / 'scripts' / 'setup.sh'


def _setup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(['bash', str(SETUP)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_python_too_old_is_named_with_the_fix(tmp_path: Path) -> None:
    fake = tmp_path / 'python3.8'
    fake.write_text('#!/bin/sh\ncase "$*" in *version_info*) exit 1;; '
                    '*python_version*) echo 3.8.10;; esac\n')
    fake.chmod(0o755)
    proc = _setup({'PYTHON': str(fake)})
    assert proc.returncode == 1
    assert 'Python 3.8.10 is too old' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_missing_compiler_prints_the_apt_line(tmp_path: Path) -> None:
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    hidden = {'cmake', 'g++', 'c++'}
    for directory in ('/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin',
                      '/bin'):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            link = bin_dir / name
            if name not in hidden and not link.exists():
                link.symlink_to(os.path.join(directory, name))
    python = bin_dir / 'python3'
    python.unlink(missing_ok=True)
    python.symlink_to(os.path.realpath(sys.executable))
    proc = _setup({'PATH': str(bin_dir), 'IFLYBOT_NO_APT': '1'})
    assert proc.returncode == 1
    assert 'missing system packages: cmake g++' in proc.stderr
    assert 'apt-get install -y --no-install-recommends cmake g++' in proc.stderr


def test_unreachable_package_index_is_reported(tmp_path: Path) -> None:
    proc = _setup({'IFLYBOT_VENV': str(tmp_path / 'venv'), 'PIP_CONFIG_FILE': '/dev/null',
                   'PIP_INDEX_URL': 'http://127.0.0.1:9/simple', 'PIP_RETRIES': '0',
                   'PIP_TIMEOUT': '3', 'PIP_FIND_LINKS': '', 'PIP_EXTRA_INDEX_URL': ''})
    assert proc.returncode == 1
    assert 'cannot reach the Python package index: http://127.0.0.1:9/simple/pip/' in proc.stderr
    assert 'Traceback' not in proc.stderr
