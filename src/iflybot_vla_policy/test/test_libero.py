"""The LIBERO client converts observations the standard way; without LIBERO it says so."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from iflybot_vla_policy import cli
from iflybot_vla_policy.eval.libero import (
    SuiteResult,
    observation_from_libero,
    paper_table,
    quat_to_axis_angle,
)


def test_quaternion_to_axis_angle_matches_a_known_rotation() -> None:
    half = math.pi / 4                         # 90 degrees about z
    vec = quat_to_axis_angle(np.array([0.0, 0.0, math.sin(half), math.cos(half)]))
    np.testing.assert_allclose(vec, [0.0, 0.0, math.pi / 2], atol=1e-12)
    np.testing.assert_allclose(quat_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0])), 0.0)


def test_libero_observation_is_rotated_and_has_the_8_dim_state() -> None:
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    raw = {'agentview_image': image, 'robot0_eye_in_hand_image': image,
           'robot0_eef_pos': np.array([0.1, 0.2, 0.3]),
           'robot0_eef_quat': np.array([0.0, 0.0, 0.0, 1.0]),
           'robot0_gripper_qpos': np.array([0.04, -0.04])}
    obs = observation_from_libero(raw, 'put the bowl on the plate')
    np.testing.assert_array_equal(obs['images']['scene_camera'], image[::-1, ::-1])
    assert obs['state'].dtype == np.float32 and obs['state'].shape == (8,)
    np.testing.assert_allclose(obs['state'], [0.1, 0.2, 0.3, 0, 0, 0, 0.04, -0.04], atol=1e-6)
    assert obs['instruction'] == 'put the bowl on the plate'


def test_paper_table_has_the_papers_columns_and_average() -> None:
    table = paper_table([SuiteResult('libero_spatial', 10, 9),
                         SuiteResult('libero_object', 10, 10),
                         SuiteResult('libero_goal', 10, 8), SuiteResult('libero_10', 10, 7)])
    assert table.splitlines()[0] == '| Method | Spatial | Object | Goal | Long | Average |'
    assert table.splitlines()[2] == '| ours | 90.0 | 100.0 | 80.0 | 70.0 | 85.0 |'


@pytest.mark.skipif(importlib.util.find_spec('libero') is not None, reason='LIBERO is installed')
def test_without_libero_the_command_explains_and_fails(tmp_path, capsys) -> None:
    rc = cli.main(['libero', '--checkpoint', str(tmp_path), '--out', str(tmp_path / 'out')])
    assert rc == 2
    err = capsys.readouterr().err
    assert 'LIBERO is not installed' in err and 'cannot be downloaded' in err
