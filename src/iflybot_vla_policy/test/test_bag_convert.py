"""bag -> LeRobot dataset conversion: alignment, action sources, filters, bad bags."""
from __future__ import annotations

import numpy as np
import pytest

from iflybot_vla_policy.data import bags
from iflybot_vla_policy.data.convert import (
    ConversionError,
    ConvertConfig,
    bag_to_episode,
    bags_to_dataset,
)
from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset
from recording_fixtures import (
    T0_NS,
    commanded,
    commanded_gripper,
    frame_image,
    write_synthetic_bag,
)

FPS = 10


def test_action_at_frame_t_is_the_commanded_target_one_frame_ahead(tmp_path):
    bag = write_synthetic_bag(tmp_path / 'ep0')
    ep, source = bag_to_episode(bag, ConvertConfig(fps=FPS, action_source='command'))
    assert source == 'command'
    # Frames start where joint states and both cameras overlap: the first image at 3 ms.
    t = 0.003 + np.arange(ep.length) / FPS
    np.testing.assert_allclose(ep.action[:, :7], commanded(t + 1 / FPS), atol=1e-6)
    np.testing.assert_allclose(ep.action[:, 7], commanded_gripper(t + 1 / FPS), atol=1e-9)
    # The state is measured (lagging the setpoint), not the command.
    assert np.abs(ep.state[:, :7] - ep.action[:, :7]).max() > 0.01


def test_unstamped_trajectory_on_a_sim_clock_is_aligned_by_receive_time(tmp_path):
    # Stamps on the simulator's clock, receive times on wall time, trajectory stamped 0 (now).
    bag = write_synthetic_bag(tmp_path / 'ep0', sim_clock=True)
    ep, _ = bag_to_episode(bag, ConvertConfig(fps=FPS, action_source='command'))
    t = 0.003 + np.arange(ep.length) / FPS
    np.testing.assert_allclose(ep.action[:, :7], commanded(t + 1 / FPS), atol=1e-6)


def test_state_is_interpolated_joint_states_and_images_are_picked_by_stamp(tmp_path):
    bag = write_synthetic_bag(tmp_path / 'ep0', js_rate=50.0)
    ep, _ = bag_to_episode(bag, ConvertConfig(fps=FPS))
    assert ep.state.shape == (ep.length, 8) and ep.state.dtype == np.float32
    assert np.all(ep.state[:, 7] <= 0.08 + 1e-6) and ep.state[-1, 7] < 0.03   # closed
    t = 0.003 + np.arange(ep.length) / FPS
    for k in (0, 5, ep.length - 1):
        want = frame_image(t[k], 200)
        np.testing.assert_array_equal(ep.images['wrist_camera'][k], want)
    assert ep.instruction == 'put the red cube in the bowl' and ep.task_name == 'pick_place'


def test_next_state_actions_when_no_trajectory_was_commanded(tmp_path):
    bag = write_synthetic_bag(tmp_path / 'ep0', with_trajectory=False)
    ep, source = bag_to_episode(bag, ConvertConfig(fps=FPS))
    assert source == 'next_state'
    np.testing.assert_allclose(ep.action[:-1], ep.state[1:], atol=1e-6)


def test_converted_dataset_round_trips_and_filters_failures(tmp_path):
    paths = [write_synthetic_bag(tmp_path / 'rec' / f'ep{i}', success=i != 1) for i in range(3)]
    report = bags_to_dataset([tmp_path / 'rec'], tmp_path / 'ds',
                             ConvertConfig(fps=FPS, success_only=True), progress=False)
    assert report.written == ['ep0', 'ep2'] and report.skipped == [(str(paths[1]),
                                                                    'not successful')]
    ds = LeRobotDataset(tmp_path / 'ds')
    assert ds.num_episodes == 2 and ds.fps == FPS and ds.cameras == ['scene_camera',
                                                                       'wrist_camera']
    t = 0.003 + np.arange(ds.episodes[1]['length']) / FPS
    np.testing.assert_allclose(ds.episode_arrays(1)['action'][:, :7], commanded(t + 1 / FPS),
                               atol=1e-5)


def test_corrupted_bag_gives_a_clear_error(tmp_path):
    bag = write_synthetic_bag(tmp_path / 'ep0')
    mcap = next(bag.glob('*.mcap'))
    data = bytearray(mcap.read_bytes())
    data[100:4000] = b'\xff' * 3900
    mcap.write_bytes(bytes(data))
    with pytest.raises(bags.BagError, match='ep0'):
        bag_to_episode(bag, ConvertConfig(fps=FPS))


def test_bag_without_joint_states_names_the_missing_topic(tmp_path):
    writer = bags.BagWriter(tmp_path / 'empty')
    writer.write_message('/vla/instruction', 'std_msgs/msg/String', T0_NS,
                         bags.make_message('std_msgs/msg/String', data='x'))
    writer.close()
    with pytest.raises(ConversionError, match='joint states'):
        bag_to_episode(tmp_path / 'empty', ConvertConfig(fps=FPS))
