"""ament_python package of the iFlyBot-VLA core library, its ROS nodes and the iflybot CLI."""
import os
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = 'iflybot_vla_policy'
HERE = Path(__file__).resolve().parent
REPO_CONFIG = HERE.parent.parent / 'config'


def _config_files() -> list[tuple[str, list[str]]]:
    """Install the repository's config/ presets to share/<package>/config/..."""
    entries: dict[str, list[str]] = {}
    if REPO_CONFIG.is_dir():
        for path in sorted(REPO_CONFIG.rglob('*')):
            if path.is_file():
                rel_dir = path.parent.relative_to(REPO_CONFIG.parent)
                target = f'share/{PACKAGE}/{rel_dir}'
                entries.setdefault(target, []).append(os.path.relpath(path, HERE))
    return list(entries.items())


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        *_config_files(),
    ],
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='iFlyBot-VLA ROS developers',
    maintainer_email='dev@iflybot-vla.org',
    description='iFlyBot-VLA core library, ROS 2 nodes and the iflybot CLI',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            'iflybot = iflybot_vla_policy.cli:main',
            'iflybot_sim = iflybot_vla_policy.ros.sim_node:main',
            'iflybot_policy = iflybot_vla_policy.ros.policy_node:main',
            'iflybot_recorder = iflybot_vla_policy.ros.recorder_node:main',
            'iflybot_teleop = iflybot_vla_policy.ros.teleop_node:main',
            'iflybot_expert_teleop = iflybot_vla_policy.ros.expert_teleop_node:main',
        ],
    },
)
