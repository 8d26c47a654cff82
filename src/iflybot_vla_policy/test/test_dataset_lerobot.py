"""The LeRobot v3.0 writer, reader and torch loaders: round trips of in-memory episodes."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from iflybot_vla_policy.data.lerobot_format import EpisodeData
from iflybot_vla_policy.data.lerobot_reader import DatasetError, LeRobotDataset
from iflybot_vla_policy.data.lerobot_writer import WriterConfig, write_dataset
from iflybot_vla_policy.data.loader import ActionChunkDataset, FramePairDataset

FPS = 10


def _episode(t: int, seed: int, instruction: str, success: bool = True) -> EpisodeData:
    rng = np.random.default_rng(seed)
    state = rng.normal(size=(t, 8)).astype(np.float32)
    action = (state + 0.1).astype(np.float32)
    # Each frame encodes its index as a bright square position plus a channel level, so frames
    # can be told apart after lossy compression.
    images = {}
    for cam, level in (('scene_camera', 40), ('wrist_camera', 200)):
        frames = np.zeros((t, 32, 48, 3), np.uint8)
        for k in range(t):
            frames[k, :, :, 0] = level
            frames[k, 8:24, 2 * k % 40:2 * k % 40 + 8, 1] = 255
        images[cam] = frames
    return EpisodeData(state=state, action=action, images=images, instruction=instruction,
                       task_name='pick_place', success=success, episode_id=f'ep{seed}',
                       extra={'observation.object_pose': rng.normal(size=(t, 7)).astype(
                           np.float32)})


@pytest.fixture
def episodes() -> list[EpisodeData]:
    return [_episode(12, 0, 'put the red cube in the bowl'),
            _episode(7, 1, 'stack the cubes', success=False),
            _episode(9, 2, 'put the red cube in the bowl')]


def test_written_dataset_has_the_v3_layout_and_metadata(tmp_path, episodes):
    root = write_dataset(tmp_path / 'ds', episodes, WriterConfig(fps=FPS))
    info = json.loads((root / 'meta/info.json').read_text())
    assert info['codebase_version'] == 'v3.0'
    assert info['total_episodes'] == 3 and info['total_frames'] == 28 and info['total_tasks'] == 2
    assert info['features']['observation.state']['shape'] == [8]
    assert info['features']['observation.state']['names'][-1] == 'gripper_width'
    assert info['features']['observation.images.scene_camera']['dtype'] == 'video'
    assert (root / 'data/chunk-000/file-000.parquet').is_file()
    assert (root / 'videos/observation.images.wrist_camera/chunk-000/file-000.mp4').is_file()
    eps = pq.read_table(root / 'meta/episodes/chunk-000/file-000.parquet').to_pylist()
    assert [e['length'] for e in eps] == [12, 7, 9]
    assert eps[1]['dataset_from_index'] == 12 and eps[1]['dataset_to_index'] == 19
    assert eps[1]['videos/observation.images.scene_camera/from_timestamp'] == pytest.approx(1.2)
    assert eps[1]['success'] is False and eps[0]['task_name'] == 'pick_place'
    tasks = pq.read_table(root / 'meta/tasks.parquet').to_pylist()
    assert {t['task'] for t in tasks} == {'put the red cube in the bowl', 'stack the cubes'}
    stats = json.loads((root / 'meta/stats.json').read_text())
    all_states = np.concatenate([e.state for e in episodes])
    np.testing.assert_allclose(stats['observation.state']['mean'], all_states.mean(0), atol=1e-5)
    assert np.array(stats['observation.images.scene_camera']['mean']).shape == (3, 1, 1)


def test_reader_returns_the_written_arrays_and_frames(tmp_path, episodes):
    root = write_dataset(tmp_path / 'ds', episodes, WriterConfig(fps=FPS))
    ds = LeRobotDataset(root)
    assert ds.cameras == ['scene_camera', 'wrist_camera'] and ds.num_frames == 28
    arrays = ds.episode_arrays(2)
    np.testing.assert_array_equal(arrays['observation.state'], episodes[2].state)
    np.testing.assert_array_equal(arrays['observation.object_pose'],
                                  episodes[2].extra['observation.object_pose'])
    start, _ = ds.episode_range(2)
    got = ds.images('wrist_camera', [start + 5, start + 0, start + 8]).astype(int)
    want = episodes[2].images['wrist_camera'][[5, 0, 8]].astype(int)
    assert np.abs(got - want).mean() < 4.0
    assert ds.instruction(start) == 'put the red cube in the bowl'


def test_action_chunks_pad_past_the_episode_end(tmp_path, episodes):
    ds = ActionChunkDataset(write_dataset(tmp_path / 'ds', episodes, WriterConfig(fps=FPS)),
                            horizon=5)
    item = ds[12 + 4]          # episode 1 (7 frames), frame 4: frames 4..6 real, 2 padded
    np.testing.assert_array_equal(item['actions'][:3].numpy(), episodes[1].action[4:7])
    np.testing.assert_array_equal(item['actions'][3:].numpy(),
                                  np.repeat(episodes[1].action[6:7], 2, 0))
    assert item['action_is_pad'].tolist() == [False, False, False, True, True]
    assert item['images']['scene_camera'].shape == (32, 48, 3)
    assert item['instruction'] == 'stack the cubes'
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch['actions'].shape == (4, 5, 8) and batch['state'].dtype == torch.float32


def test_success_only_drops_failed_episodes(tmp_path, episodes):
    ds = ActionChunkDataset(write_dataset(tmp_path / 'ds', episodes, WriterConfig(fps=FPS)),
                            horizon=2, success_only=True, load_images=False)
    assert len(ds) == 12 + 9 and ds.episode_indices == [0, 2]


def test_frame_pairs_are_offset_seconds_apart_within_an_episode(tmp_path, episodes):
    pairs = FramePairDataset(write_dataset(tmp_path / 'ds', episodes, WriterConfig(fps=FPS)),
                             offset_s=0.5, camera='scene_camera', image_size=(16, 24))
    assert pairs.offset == 5
    item = pairs[0]
    assert item['offset_frames'] == 5 and item['frame'].shape == (16, 24, 3)
    last = pairs[11]          # frame 11 of 12: partner clipped to the last frame
    assert last['offset_frames'] == 0


def test_mismatched_episode_is_rejected_with_the_feature_name(tmp_path, episodes):
    bad = _episode(5, 3, 'x')
    bad.images['scene_camera'] = np.zeros((5, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match='scene_camera'):
        write_dataset(tmp_path / 'ds', [episodes[0], bad], WriterConfig(fps=FPS))


def test_reading_a_non_dataset_names_the_missing_file(tmp_path):
    with pytest.raises(DatasetError, match='info.json'):
        LeRobotDataset(tmp_path)
