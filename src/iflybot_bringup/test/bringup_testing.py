"""Helpers and fixtures of the bring-up tests.

Not a conftest.py: the core tests import `conftest` by name, and a second conftest.py on
sys.path would shadow theirs. Test modules import the fixtures from here.
"""
from __future__ import annotations

import json
import os
import random
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TEST_PACKAGE = 'iflybot_test_nodes'

os.environ.setdefault('ROS_DOMAIN_ID', str(random.randint(1, 100)))
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')


@pytest.fixture(name='ament_prefix')
def ament_prefix_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ament prefix holding package iflybot_test_nodes with executable `dummy_node`.

    Prepended to AMENT_PREFIX_PATH, so the runner finds it as `ros2 run` would.
    """
    prefix = tmp_path / 'prefix'
    index = prefix / 'share/ament_index/resource_index/packages'
    index.mkdir(parents=True)
    (index / TEST_PACKAGE).write_text('')
    (prefix / 'share' / TEST_PACKAGE).mkdir(parents=True)
    lib = prefix / 'lib' / TEST_PACKAGE
    lib.mkdir(parents=True)
    exe = lib / 'dummy_node'
    exe.write_text(f'#!{sys.executable}\n' + (HERE / 'dummy_node.py').read_text())
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv('AMENT_PREFIX_PATH',
                       f'{prefix}{os.pathsep}{os.environ.get("AMENT_PREFIX_PATH", "")}')
    return prefix


def wait_for(predicate: Callable[[], object], timeout: float = 30.0,
             poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return bool(predicate())


def read_report(path: Path) -> dict[str, object]:
    """The dummy node's JSON report, or {} while it has not written one yet."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
