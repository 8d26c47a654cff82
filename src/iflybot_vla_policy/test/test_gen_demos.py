"""`iflybot gen-demos`: expert episodes from the simulator written as a LeRobot v3.0 dataset."""
from __future__ import annotations

import json

import numpy as np

from iflybot_vla_policy.cli import main
from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset


def test_gen_demos_writes_successful_expert_episodes_in_parallel(tmp_path, capsys):
    out = tmp_path / 'demos'
    rc = main(['gen-demos', '--task', 'pick_place', '--episodes', '2', '--workers', '2',
               '--out', str(out), '--image-size', '64', '64', '--seed-start', '10'])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['per_task']['pick_place'] == {'success': 2, 'failure': 0}
    ds = LeRobotDataset(out)
    assert ds.num_episodes == 2 and ds.fps == 10
    assert sorted(ds.cameras) == ['scene_camera', 'wrist_camera']
    assert [e['seed'] for e in ds.episodes] == [10, 11]
    assert all(e['success'] and e['task_name'] == 'pick_place' for e in ds.episodes)
    for e in range(2):
        arrays = ds.episode_arrays(e)
        state, action = arrays['observation.state'], arrays['action']     # (T, 8) each
        assert state.shape[1] == 8 and action.shape == state.shape
        # action t is the commanded target for frame t+1: the arm tracks it closely
        err = np.abs(state[1:, :7] - action[:-1, :7]).max(axis=1)
        assert np.median(err) < 0.02
        # the gripper closes on the cube and opens over the bowl
        assert action[:, 7].min() < 0.01 and action[-1, 7] > 0.07
        start, _ = ds.episode_range(e)
        frame = ds.images('scene_camera', [start])[0]
        assert frame.shape == (64, 64, 3) and frame.std() > 5
        assert 'bowl' in ds.instruction(start)


def test_gen_demos_refuses_held_out_evaluation_seeds(tmp_path, capsys):
    from iflybot_vla_policy.sim.tasks import EVAL_SEEDS

    rc = main(['gen-demos', '--task', 'push', '--episodes', '1', '--workers', '1',
               '--out', str(tmp_path / 'x'), '--seed-start', str(EVAL_SEEDS.start)])
    assert rc == 2
    assert 'training seed' in capsys.readouterr().err


def test_gen_demos_rejects_unknown_tasks(tmp_path, capsys):
    assert main(['gen-demos', '--task', 'juggle', '--episodes', '1',
                 '--out', str(tmp_path / 'x')]) == 2
    assert 'juggle' in capsys.readouterr().err


def test_an_articulated_task_records_a_successful_episode():
    from iflybot_vla_policy.training.sim_demos import DemoSpec, record_episode

    ep = record_episode('drawer', 3, DemoSpec(image_size=(32, 32)))
    assert ep.success and ep.length > 20
    assert ep.images['wrist_camera'].shape == (ep.length, 32, 32, 3)


def test_an_offset_start_episode_begins_off_the_cube_and_the_expert_corrects_it():
    from iflybot_vla_policy.sim.env import make_env
    from iflybot_vla_policy.training.sim_demos import DemoSpec, record_episode

    spec = DemoSpec(image_size=(32, 32), offset_start=(0.04, 0.05))
    ep = record_episode('pick_place', 21, spec)
    plain = record_episode('pick_place', 21, DemoSpec(image_size=(32, 32)))
    assert ep.success
    env = make_env('pick_place', seed=21, image_size=(32, 32))
    cube = str(env.task.state.plan['object'])
    adr = env.model.joint(cube).qposadr[0]
    centre = env.data.qpos[adr:adr + 2].copy()             # the same scene as the reset's
    env.place_arm(ep.state[0, :7].astype(np.float64), settle=0.0)
    tcp, _ = env.tcp_pose()
    assert 0.035 < np.linalg.norm(tcp[:2] - centre) < 0.055
    # not the reset's start: the arm begins elsewhere, hand open
    assert np.abs(ep.state[0, :7] - plain.state[0, :7]).max() > 0.05
    assert ep.state[0, 7] > 0.07
    # and the offset is deterministic per seed
    again = record_episode('pick_place', 21, spec)
    np.testing.assert_array_equal(again.state[0], ep.state[0])


def test_gen_demos_refuses_offset_starts_for_tasks_without_a_pick(tmp_path, capsys):
    assert main(['gen-demos', '--task', 'push', '--episodes', '1', '--offset-start', '0.02',
                 '0.05', '--out', str(tmp_path / 'x')]) == 2
    assert '--offset-start' in capsys.readouterr().err
    assert main(['gen-demos', '--task', 'pick_place', '--episodes', '1', '--offset-start',
                 '0.05', '0.02', '--out', str(tmp_path / 'y')]) == 2


def test_place_arm_refuses_joints_outside_the_limits():
    import pytest

    from iflybot_vla_policy.sim.env import make_env

    env = make_env('pick_place', seed=0, image_size=(32, 32))
    q = env.robot.q_max + 0.1
    with pytest.raises(ValueError, match='joint limits'):
        env.place_arm(q)
    with pytest.raises(ValueError, match='7 finite'):
        env.place_arm(np.full(7, np.nan))
