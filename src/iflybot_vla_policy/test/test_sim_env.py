"""The MuJoCo work cell: kinematics match the robot description, control, cameras, tasks."""
from __future__ import annotations

import numpy as np
import pytest

from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.sim import (
    EVAL_SEEDS,
    TASKS,
    TRAIN_SEEDS,
    TrajectoryError,
    make_env,
    make_expert,
    run_expert_episode,
)

ROBOT = load_robot()


@pytest.fixture(scope='module')
def env():
    with make_env('pick_place', seed=0, image_size=(96, 128)) as e:
        yield e


def test_mjcf_tcp_matches_robot_description_forward_kinematics(env) -> None:
    rng = np.random.default_rng(0)
    for q in [ROBOT.home, *rng.uniform(ROBOT.q_min, ROBOT.q_max, size=(20, 7))]:
        pos, rot = env.kinematics.tcp_pose(q)
        expected = ROBOT.forward_kinematics(q)
        np.testing.assert_allclose(pos, expected[:3, 3], atol=1e-9)
        np.testing.assert_allclose(rot, expected[:3, :3], atol=1e-8)


def test_fingers_open_to_franka_hand_range(env) -> None:
    env.reset(0)
    assert env.gripper_width == pytest.approx(ROBOT.gripper.max_width, abs=1e-3)
    env.command_gripper(0.03)
    env.step(1.0)
    assert env.gripper_width == pytest.approx(0.03, abs=1e-3)
    env.command_gripper(0.5)     # clipped to the hand's range
    env.step(1.0)
    assert env.gripper_width == pytest.approx(0.08, abs=1e-3)


def test_commanded_trajectory_is_tracked_tightly(env) -> None:
    env.reset(0)
    start = env.joint_positions[:7]
    goal = start + np.array([0.3, 0.2, -0.2, 0.3, 0.2, -0.3, 0.4])
    env.command_joint_trajectory([(start + goal) / 2, goal], [0.6, 1.2],
                                 velocities=[(goal - start) / 1.2 * 1.5, np.zeros(7)])
    worst = 0.0
    for _ in range(150):
        env.step(0.01)
        worst = max(worst, float(np.max(np.abs(env.desired.positions - env.joint_positions[:7]))))
    assert worst < 0.01
    np.testing.assert_allclose(env.joint_positions[:7], goal, atol=1e-3)


def test_rejected_trajectory_leaves_the_arm_holding(env) -> None:
    env.reset(0)
    start = env.joint_positions[:7]
    with pytest.raises(TrajectoryError, match='outside its limits'):
        env.command_joint_trajectory([start + np.array([0, 0, 0, 5.0, 0, 0, 0])], [1.0])
    env.step(0.5)
    np.testing.assert_allclose(env.joint_positions[:7], start, atol=1e-3)


def test_twist_moves_the_tcp_at_the_commanded_velocity(env) -> None:
    env.reset(0)
    before = env.tcp_pose()[0]
    for _ in range(50):          # 0.5 s of 0.1 m/s along +y, refreshed like a Servo client
        env.command_twist([0.0, 0.1, 0.0], [0.0, 0.0, 0.0])
        env.step(0.01)
    moved = env.tcp_pose()[0] - before
    assert moved[1] == pytest.approx(0.05, abs=0.006)
    assert abs(moved[0]) < 0.005 and abs(moved[2]) < 0.005


def test_twist_stops_after_the_command_times_out(env) -> None:
    env.reset(0)
    env.command_twist([0.0, 0.0, 0.1])
    env.step(1.0)
    held = env.tcp_pose()[0]
    env.step(0.5)
    np.testing.assert_allclose(env.tcp_pose()[0], held, atol=1e-4)


def test_both_cameras_render_headless_as_rgb_uint8(env) -> None:
    env.reset(0)
    obs = env.observe()
    assert set(obs['images']) == {'scene_camera', 'wrist_camera'}
    for image in obs['images'].values():
        assert image.shape == (96, 128, 3) and image.dtype == np.uint8
        assert image.std() > 10           # a scene, not a blank frame
    assert not np.array_equal(obs['images']['scene_camera'], obs['images']['wrist_camera'])
    assert obs['state'].shape == (8,) and obs['state'].dtype == np.float32
    assert obs['instruction']


def test_same_seed_same_scene_and_seed_ranges_are_disjoint(env) -> None:
    env.reset(7)
    first = [(o.name, o.color, o.position.copy()) for o in env.objects()]
    text = env.instruction
    env.reset(8)
    assert [o.position.tolist() for o in env.objects()] != [p.tolist() for _, _, p in first]
    env.reset(7)
    assert env.instruction == text
    for (name, color, pos), obj in zip(first, env.objects(), strict=True):
        assert (name, color) == (obj.name, obj.color)
        np.testing.assert_allclose(pos, obj.position, atol=1e-9)
    assert max(TRAIN_SEEDS) < min(EVAL_SEEDS)


def test_instructions_vary_and_name_the_colours_of_the_objects() -> None:
    env = make_env('stack', seed=0, render=False)
    texts = set()
    for seed in range(12):
        env.reset(seed)
        texts.add(env.instruction)
        colors = {o.name: o.color for o in env.objects()}
        assert colors['cube_a'] in env.instruction and colors['cube_b'] in env.instruction
    assert len(texts) >= 8


@pytest.mark.parametrize('task', sorted(TASKS))
def test_grounding_points_are_the_named_object_then_its_destination(task: str) -> None:
    env = make_env(task, seed=0, render=False)
    for seed in range(3):
        env.reset(seed)
        points = env.task.grounding_points(env)                      # (2, 3)
        if task == 'drawer':   # named by colour or side; the drawer is object and destination
            drawer = {o.name: o for o in env.objects()}[env.task.state.plan['drawer']]
            np.testing.assert_allclose(points, [drawer.position] * 2)
            continue
        by_colour = {o.color: o for o in env.objects() if o.kind != 'cabinet'}
        # the instruction names colours in order: the acted-on object, then the destination
        named = sorted((env.instruction.index(c), c) for c in by_colour
                       if f' {c} ' in f' {env.instruction} ')
        first, last = by_colour[named[0][1]], by_colour[named[-1][1]]
        np.testing.assert_allclose(points[0], first.position)
        np.testing.assert_allclose(points[1], last.position)
    env.close()


@pytest.mark.parametrize('task', sorted(TASKS))
def test_expert_solves_each_task_and_success_is_false_at_reset(task: str) -> None:
    env = make_env(task, seed=0, render=False)
    for seed in (TRAIN_SEEDS[3], EVAL_SEEDS[3]):
        env.reset(seed)
        assert not env.success()
        assert run_expert_episode(env, max_time=20.0), f'{task} seed {seed}'


def test_expert_emits_joint_and_end_effector_chunks() -> None:
    env = make_env('pick_place', seed=1, render=False)
    expert = make_expert(env, horizon=8, dt=0.05)
    joint = expert.next_chunk(env.observe())
    assert joint.shape == (8, 8) and joint.dtype == np.float32
    assert np.all(joint[:, :7] >= ROBOT.q_min) and np.all(joint[:, :7] <= ROBOT.q_max)
    ee = expert.next_chunk(env.observe(), mode='ee_delta')
    assert ee.shape == (8, 7)
    assert np.all(np.linalg.norm(ee[:, :3], axis=1) <= 0.25 * 0.05 + 1e-6)   # speed limit


def test_expert_solves_pick_place_through_servo_twists() -> None:
    env = make_env('pick_place', seed=2, render=False)
    assert run_expert_episode(env, max_time=20.0, mode='twist')


def test_snapshot_command_writes_a_png_per_task_and_camera(tmp_path) -> None:
    from PIL import Image

    from iflybot_vla_policy.cli import main

    assert main(['sim', '--snapshot', str(tmp_path), '--tasks', 'push', 'drawer',
                 '--image-size', '48', '64']) == 0
    names = sorted(p.name for p in tmp_path.glob('*.png'))
    assert names == ['drawer_scene_camera.png', 'drawer_wrist_camera.png',
                     'push_scene_camera.png', 'push_wrist_camera.png']
    assert Image.open(tmp_path / 'push_scene_camera.png').size == (64, 48)
