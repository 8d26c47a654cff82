"""The iflybot command explains itself and fails clearly on misuse."""
from __future__ import annotations

import subprocess
import sys

import pytest

from iflybot_vla_policy import cli


def _iflybot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, '-m', 'iflybot_vla_policy.cli', *args],
                          capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command() -> None:
    proc = _iflybot('--help')
    assert proc.returncode == 0
    for name, _module, _help in cli.COMMANDS:
        assert name in proc.stdout


@pytest.mark.parametrize('name', [name for name, _m, _h in cli.COMMANDS])
def test_every_command_has_help(name: str) -> None:
    proc = _iflybot(name, '--help')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f'usage: iflybot {name}')


def test_unknown_command_names_the_valid_ones() -> None:
    proc = _iflybot('trian')
    assert proc.returncode == 2
    assert "unknown command 'trian'" in proc.stderr
    assert 'doctor' in proc.stderr


def test_no_arguments_prints_usage_and_fails() -> None:
    proc = _iflybot()
    assert proc.returncode == 2
    assert 'usage: iflybot' in proc.stdout


def test_doctor_reports_the_interfaces_and_rmw() -> None:
    proc = _iflybot('doctor')
    assert 'rmw_fastrtps_cpp' in proc.stdout
    assert 'ActionChunk, StartEpisode, RunPolicy importable' in proc.stdout
    assert proc.returncode == 0, proc.stdout
