"""Cameras of the franka, record and gazebo graphs: what they start, resolved as ros2 launch would.

RealSense hardware and Gazebo do not exist here, so these tests check the graphs against the
interfaces they rely on (names checked upstream: docker/README.md): the drivers' parameters and
remaps land the images on the topics the policy subscribes to (the remap rule is applied by real
rcl), the static transforms put each camera where the MuJoCo simulator has it, and the Gazebo
world's camera topics are the ones the bridge configuration maps to the policy's topics.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy.spatial.transform import Rotation
from test_bringup_launch import (
    fake_launch,  # noqa: F401 (a fixture)
    launched_nodes,
    load_launch_file,
)

from iflybot_bringup import graph as graph_mod

CONFIG = graph_mod.bringup_dir() / 'config'
POLICY = yaml.safe_load((CONFIG / 'policy.yaml').read_text())['iflybot_policy']['ros__parameters']
CAMERA_TOPICS = dict(zip(POLICY['camera_names'], POLICY['camera_topics'], strict=True))
CAMERA_NODES = ['scene_camera', 'wrist_camera', 'scene_camera_tf', 'wrist_camera_tf']


def _nodes(graph: str, overrides: dict[str, str] | None = None
           ) -> dict[str, graph_mod.ResolvedNode]:
    resolved = graph_mod.resolve(graph_mod.load_graph(graph), overrides or {})
    return {n.name: n for n in resolved.nodes}


def _transform(arguments: tuple[str, ...]) -> tuple[str, str, np.ndarray, np.ndarray]:
    """static_transform_publisher's named arguments -> (parent, child, xyz, rotation matrix)."""
    flags = dict(zip(arguments[::2], arguments[1::2], strict=True))
    assert len(flags) * 2 == len(arguments)
    assert set(flags) == {'--x', '--y', '--z', '--roll', '--pitch', '--yaw', '--frame-id',
                          '--child-frame-id'}
    xyz = np.array([float(flags[k]) for k in ('--x', '--y', '--z')])
    rpy = [float(flags[k]) for k in ('--roll', '--pitch', '--yaw')]
    # tf2's setRPY: fixed-axis roll, pitch, yaw (scipy's extrinsic 'xyz')
    rot = Rotation.from_euler('xyz', rpy).as_matrix()
    return flags['--frame-id'], flags['--child-frame-id'], xyz, rot


@pytest.fixture(scope='module')
def sim_cameras() -> dict[str, Any]:
    """The MuJoCo simulator's camera poses, in the ROS camera_link convention (x forward, z up):
    the scene camera in the world (= fr3_link0), the wrist camera in fr3_hand, and fr3_hand's
    world pose at the FR3's home pose."""
    mujoco = pytest.importorskip('mujoco')
    from iflybot_vla_policy.robot import load_robot
    from iflybot_vla_policy.sim import make_env

    env = make_env('pick_place', seed=0, render=False, home_noise=0.0)
    model, data = env.model, env.data
    for name, q in zip([f'fr3_joint{i}' for i in range(1, 8)], load_robot().home, strict=True):
        data.qpos[model.jnt_qposadr[model.joint(name).id]] = q
    mujoco.mj_forward(model, data)

    def camera(name: str) -> tuple[np.ndarray, np.ndarray]:
        i = model.camera(name).id
        m = data.cam_xmat[i].reshape(3, 3)          # MuJoCo: looks along -z, image up is +y
        return data.cam_xpos[i].copy(), np.column_stack([-m[:, 2], -m[:, 0], m[:, 1]])

    hand = model.body('fr3_hand').id
    hand_pos, hand_rot = data.xpos[hand].copy(), data.xmat[hand].reshape(3, 3).copy()
    wrist_pos, wrist_rot = camera('wrist_camera')
    return {'scene': camera('scene_camera'), 'hand': (hand_pos, hand_rot),
            'wrist_world': (wrist_pos, wrist_rot),
            'wrist_in_hand': (hand_rot.T @ (wrist_pos - hand_pos), hand_rot.T @ wrist_rot)}


# ----------------------------------------------------------------------------------- franka

def test_franka_graph_starts_both_realsense_drivers_and_their_transforms() -> None:
    nodes = _nodes('franka')
    assert set(CAMERA_NODES) <= set(nodes)
    for name in ('scene_camera', 'wrist_camera'):
        spec = nodes[name].spec
        assert (spec.package, spec.executable) == ('realsense2_camera', 'realsense2_camera_node')
        assert [f.name for f in nodes[name].params_files] == ['realsense.yaml']
    # a lost camera makes the policy hold on stale images; it must not end the robot's graph
    assert not any(nodes[name].spec.required for name in CAMERA_NODES)
    for name in ('scene_camera_tf', 'wrist_camera_tf'):
        spec = nodes[name].spec
        assert (spec.package, spec.executable) == ('tf2_ros', 'static_transform_publisher')
    assert not set(CAMERA_NODES) & set(_nodes('franka', {'cameras': 'false'}))


def test_serial_numbers_and_resolutions_are_graph_arguments() -> None:
    nodes = _nodes('franka', {'scene_camera_serial': '012345678901', 'wrist_camera_serial':
                              '230322270171', 'scene_camera_width': '1280',
                              'scene_camera_height': '720', 'wrist_camera_width': '424',
                              'wrist_camera_height': '240', 'camera_fps': '15'})
    scene, wrist = nodes['scene_camera'].params, nodes['wrist_camera'].params
    assert scene == {'serial_no': '012345678901', 'rgb_camera.color_profile': '1280x720x15'}
    # the D405 has no RGB module: its colour profile is the depth module's
    assert wrist == {'serial_no': '230322270171', 'depth_module.color_profile': '424x240x15'}
    defaults = _nodes('franka')
    assert defaults['scene_camera'].params == {'serial_no': '',
                                               'rgb_camera.color_profile': '640x480x30'}


def test_driver_parameter_file_names_each_node_and_asks_for_rgb8_colour_only() -> None:
    params = yaml.safe_load((CONFIG / 'realsense.yaml').read_text())
    assert set(params) == {'scene_camera', 'wrist_camera'}
    for name, format_key in (('scene_camera', 'rgb_camera.color_format'),
                             ('wrist_camera', 'depth_module.color_format')):
        p = params[name]['ros__parameters']
        assert p['camera_name'] == name         # frames <name>_link, <name>_color_optical_frame
        assert (p['enable_color'], p['enable_depth'], p[format_key]) == (True, False, 'RGB8')


def test_driver_images_land_on_the_policys_topics_through_rcl_remapping() -> None:
    """The realsense node publishes ~/color/image_raw (D435) or ~/color/image_rect_raw (D405):
    real rcl applies the graph's remaps as the node's command line gives them."""
    rclpy = pytest.importorskip('rclpy')
    from sensor_msgs.msg import CameraInfo, Image

    nodes = _nodes('franka')
    for camera, private in (('scene_camera', '~/color/image_raw'),
                            ('wrist_camera', '~/color/image_rect_raw')):
        node = nodes[camera]
        argv = ['driver', '--ros-args', '-r', f'__node:={node.name}']
        for src, dst in node.remaps:
            argv += ['-r', f'{src}:={dst}']
        context = rclpy.Context()
        rclpy.init(args=argv, context=context)
        try:
            ros_node = rclpy.create_node('camera', context=context)
            image = ros_node.create_publisher(Image, private, 1)
            info = ros_node.create_publisher(CameraInfo, '~/color/camera_info', 1)
            assert image.topic_name == CAMERA_TOPICS[camera]
            assert info.topic_name == CAMERA_TOPICS[camera].replace('image_raw', 'camera_info')
            ros_node.destroy_node()
        finally:
            rclpy.shutdown(context=context)


def test_static_transforms_put_the_cameras_where_the_simulator_has_them(
        sim_cameras: dict[str, Any]) -> None:
    nodes = _nodes('franka')
    parent, child, xyz, rot = _transform(nodes['scene_camera_tf'].arguments)
    assert (parent, child) == ('fr3_link0', 'scene_camera_link')
    pos, sim_rot = sim_cameras['scene']
    assert np.allclose(xyz, pos, atol=1e-3) and np.allclose(rot, sim_rot, atol=1e-3)
    parent, child, xyz, rot = _transform(nodes['wrist_camera_tf'].arguments)
    assert (parent, child) == ('fr3_hand', 'wrist_camera_link')
    pos, sim_rot = sim_cameras['wrist_in_hand']
    assert np.allclose(xyz, pos, atol=1e-3) and np.allclose(rot, sim_rot, atol=1e-3)
    # measured mounts are arguments
    moved = _nodes('franka', {'scene_camera_x': '0.9', 'scene_camera_yaw': '3.14159',
                              'wrist_camera_parent': 'fr3_link8'})
    parent, _, xyz, rot = _transform(moved['scene_camera_tf'].arguments)
    assert xyz[0] == 0.9 and np.allclose(rot[:, 0], [-math.cos(0.6694), 0, -math.sin(0.6694)],
                                         atol=1e-4)
    assert _transform(moved['wrist_camera_tf'].arguments)[0] == 'fr3_link8'


def test_franka_launch_file_starts_the_camera_nodes_the_runner_resolves(
        fake_launch: dict[str, type]) -> None:  # noqa: F811 (the imported fixture)
    overrides = {'scene_camera_serial': '012345678901', 'camera_fps': '15',
                 'wrist_camera_yaw': '0.5'}
    resolved = graph_mod.resolve(graph_mod.load_graph('franka'), overrides)
    launched = launched_nodes(load_launch_file('franka'), dict(resolved.values))
    for node in resolved.nodes:
        if node.name not in CAMERA_NODES:
            continue
        got = launched[node.fqn]
        assert {k: got['params'][k] for k in node.params} == dict(node.params)
        assert all(type(got['params'][k]) is str for k in node.params)   # serial stays text
        assert got['remaps'] == node.remaps and got['arguments'] == node.arguments


# ----------------------------------------------------------------------------------- record

def test_record_graph_on_the_robot_starts_the_franka_graphs_camera_nodes() -> None:
    """Demonstrations on the FR3 are recorded with the cameras the policy will run with: the
    same drivers, profiles, remaps and static transforms as franka.yaml, from the same
    arguments; in simulation the simulator renders the cameras and no driver starts."""
    franka_graph, record_graph = (graph_mod.load_graph(g) for g in ('franka', 'record'))
    camera_args = [a for a in franka_graph.args
                   if a.name.startswith(('scene_camera_', 'wrist_camera_', 'camera_'))]
    assert {'scene_camera_serial', 'camera_fps', 'wrist_camera_yaw'} <= {a.name
                                                                        for a in camera_args}
    assert [record_graph.arg(a.name) for a in camera_args] == camera_args
    overrides = {'scene_camera_serial': '012345678901', 'wrist_camera_serial': '230322270171',
                 'scene_camera_width': '1280', 'scene_camera_height': '720', 'camera_fps': '15',
                 'scene_camera_x': '0.9', 'wrist_camera_yaw': '0.5',
                 'wrist_camera_parent': 'fr3_link8'}
    franka = _nodes('franka', overrides)
    record = _nodes('record', {'robot': 'true', 'expert': 'false', **overrides})
    assert set(CAMERA_NODES) <= set(record)
    for name in CAMERA_NODES:
        got, want = record[name], franka[name]
        assert (got.spec.package, got.spec.executable) == (want.spec.package,
                                                           want.spec.executable)
        assert got.spec.required is False          # a lost camera must not end the recording
        assert (got.params_files, got.params, got.remaps, got.arguments) == \
            (want.params_files, want.params, want.remaps, want.arguments)
    assert record['scene_camera'].params == {'serial_no': '012345678901',
                                             'rgb_camera.color_profile': '1280x720x15'}
    assert _transform(record['wrist_camera_tf'].arguments)[0] == 'fr3_link8'
    assert not set(CAMERA_NODES) & set(_nodes('record'))
    assert not set(CAMERA_NODES) & set(_nodes('record', {'expert': 'false'}))


# ----------------------------------------------------------------------------------- gazebo

def _world() -> ET.Element:
    return ET.parse(CONFIG / 'gazebo_work_cell.sdf').getroot()


def test_gazebo_graph_loads_the_work_cell_world_and_bridges_its_cameras() -> None:
    resolved = graph_mod.resolve(graph_mod.load_graph('gazebo'))
    [include] = resolved.includes
    gz_args = graph_mod.substitute(include.args['gz_args'], resolved.values)
    run, world = gz_args.split()
    assert run == '-r' and world.endswith('/iflybot_bringup/config/gazebo_work_cell.sdf')
    assert Path(world).read_bytes() == (CONFIG / 'gazebo_work_cell.sdf').read_bytes()
    bridge = {n.name: n for n in resolved.nodes}['iflybot_camera_bridge']
    assert (bridge.spec.package, bridge.spec.executable) == ('ros_gz_bridge', 'parameter_bridge')
    assert bridge.params['use_sim_time'] is True
    config = yaml.safe_load(Path(bridge.params['config_file']).read_text())

    sensors = {s.get('name'): s for s in _world().iter('sensor') if s.get('type') == 'camera'}
    assert set(sensors) == set(CAMERA_TOPICS)
    expected = []
    for camera, ros_image in CAMERA_TOPICS.items():
        gz_image = sensors[camera].findtext('topic')
        # gz-sensors publishes camera_info beside the image: its topic's parent + /camera_info
        gz_info = gz_image.rsplit('/', 1)[0] + '/camera_info'
        expected += [
            {'ros_topic_name': ros_image, 'gz_topic_name': gz_image,
             'ros_type_name': 'sensor_msgs/msg/Image', 'gz_type_name': 'gz.msgs.Image',
             'direction': 'GZ_TO_ROS'},
            {'ros_topic_name': ros_image.replace('image_raw', 'camera_info'),
             'gz_topic_name': gz_info, 'ros_type_name': 'sensor_msgs/msg/CameraInfo',
             'gz_type_name': 'gz.msgs.CameraInfo', 'direction': 'GZ_TO_ROS'}]
    assert config == expected


def test_gazebo_world_renders_cameras_and_holds_the_work_cells_objects() -> None:
    world = _world().find('world')
    plugins = {p.get('name') for p in world.findall('plugin')}
    assert {'gz::sim::systems::Physics', 'gz::sim::systems::Sensors',
            'gz::sim::systems::SceneBroadcaster'} <= plugins   # cameras need Sensors
    models = {m.get('name'): m for m in world.findall('model')}
    assert {'table', 'cube_a', 'cube_b', 'bowl', 'scene_camera', 'wrist_camera'} <= set(models)
    for camera in CAMERA_TOPICS:
        image = models[camera].find('.//sensor/camera/image')
        assert (image.findtext('width'), image.findtext('height'),
                image.findtext('format')) == ('320', '240', 'R8G8B8')   # -> rgb8
    joint = models['wrist_camera'].find('plugin')
    assert joint.get('name') == 'gz::sim::systems::DetachableJoint'
    # franka_gazebo_bringup spawns the URDF robot named after robot_type (fr3)
    assert (joint.findtext('child_model'), joint.findtext('child_link')) == ('fr3', 'fr3_hand')


def test_gazebo_cameras_are_posed_as_the_simulators(sim_cameras: dict[str, Any]) -> None:
    """SDF camera sensors look along +x with z up, the camera_link convention; the wrist camera
    is placed at the hand's home pose, where DetachableJoint welds it."""
    models = {m.get('name'): m for m in _world().find('world').findall('model')}

    def pose(name: str) -> tuple[np.ndarray, np.ndarray]:
        values = [float(v) for v in models[name].findtext('pose').split()]
        return np.array(values[:3]), Rotation.from_euler('xyz', values[3:]).as_matrix()

    for model, key in (('scene_camera', 'scene'), ('wrist_camera', 'wrist_world')):
        (pos, rot), (sim_pos, sim_rot) = pose(model), sim_cameras[key]
        assert np.allclose(pos, sim_pos, atol=1e-3) and np.allclose(rot, sim_rot, atol=1e-3)
