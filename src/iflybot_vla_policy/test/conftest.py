"""Shared fixtures: ROS isolation for tests that start rclpy nodes, and paths of the checkout."""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]

# Every test process gets its own DDS domain and localhost-only discovery, unless the runner
# (scripts/test.sh) already chose one; child processes inherit it through os.environ.
os.environ.setdefault('ROS_DOMAIN_ID', str(random.randint(1, 232)))
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
os.environ.setdefault('MUJOCO_GL', 'egl')


@pytest.fixture
def ros_context() -> Iterator[object]:
    """A fresh rclpy Context, shut down after the test (import-guarded: core tests need no ROS)."""
    rclpy = pytest.importorskip('rclpy')
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        if context.ok():
            rclpy.shutdown(context=context)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0,
             spin: Callable[[], None] | None = None, poll: float = 0.01) -> bool:
    """Spin (or sleep) until predicate() is true or timeout elapses; returns the last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if spin is not None:
            spin()
        else:
            time.sleep(poll)
    return predicate()


@pytest.fixture
def wait() -> Callable[..., bool]:
    return wait_for
