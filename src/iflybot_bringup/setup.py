"""ament_python package with launch files, node graphs and parameters of the iFlyBot-VLA stack."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'iflybot_bringup'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml') + glob('config/*.sdf')),
        (f'share/{PACKAGE}/graphs', glob('graphs/*.yaml')),
        (f'share/{PACKAGE}/rviz', glob('rviz/*.rviz')),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='iFlyBot-VLA ROS developers',
    maintainer_email='dev@iflybot-vla.org',
    description='Launch files, node graphs and parameters of the iFlyBot-VLA stack',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={'console_scripts': [
        'gripper_bridge = iflybot_bringup.gripper_bridge:main',
        'moveit_home = iflybot_bringup.moveit_home:main',
        'foxglove_bridge = iflybot_bringup.foxglove_bridge:main',
    ]},
)
