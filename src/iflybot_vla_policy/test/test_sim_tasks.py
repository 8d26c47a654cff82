"""Tasks run on a bare MuJoCo model and data (no SimEnv): reset, objects, success, contacts."""
from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np
import pytest

from iflybot_vla_policy.robot import load_robot
from iflybot_vla_policy.sim.model import scene_xml
from iflybot_vla_policy.sim.physics import FINGER_BODIES, touching_fingers
from iflybot_vla_policy.sim.tasks import CUBE_HALF, TASKS, make_task


@dataclass
class BarePhysics:
    model: mujoco.MjModel
    data: mujoco.MjData


def _bare(task_name: str):
    task = make_task(task_name)
    model = mujoco.MjModel.from_xml_string(scene_xml(load_robot(), task.scene()))
    return task, BarePhysics(model, mujoco.MjData(model))


def _put(physics: BarePhysics, joint: str, position: np.ndarray) -> None:
    adr = physics.model.joint(joint).qposadr[0]
    physics.data.qpos[adr:adr + 3] = position
    mujoco.mj_forward(physics.model, physics.data)


@pytest.mark.parametrize('task_name', sorted(TASKS))
def test_every_task_resets_and_reports_on_model_and_data_alone(task_name: str) -> None:
    task, physics = _bare(task_name)
    task.reset(physics, np.random.default_rng(5))
    mujoco.mj_forward(physics.model, physics.data)
    names = {o.name for o in task.objects(physics)}
    assert task.state.instruction
    assert names >= {str(v) for k, v in task.state.plan.items() if k != 'yaw'}
    assert task.grounding_points(physics).shape == (2, 3)
    assert task.success(physics) is False


def test_cube_in_the_bowl_succeeds_and_a_finger_contact_is_seen() -> None:
    task, physics = _bare('pick_place')
    task.reset(physics, np.random.default_rng(0))
    mujoco.mj_forward(physics.model, physics.data)
    bowl = {o.name: o for o in task.objects(physics)}['bowl'].position
    _put(physics, 'cube_a', bowl + [0.0, 0.0, CUBE_HALF + 0.01])
    assert not touching_fingers(physics, 'cube_a')
    assert task.success(physics)
    finger = physics.data.xpos[physics.model.body(FINGER_BODIES[0]).id]
    _put(physics, 'cube_a', finger.copy())          # overlapping the finger: a contact
    assert touching_fingers(physics, 'cube_a')
    assert not touching_fingers(physics, 'cube_b')
