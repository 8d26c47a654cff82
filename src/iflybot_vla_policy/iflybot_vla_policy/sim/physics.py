"""The part of a running simulation that scene code reads and writes: MuJoCo's model and data.

Tasks take any object with these two attributes (`SimEnv` is one), so `sim/tasks.py` depends on
MuJoCo and not on the environment that steps it, and the environment can import the tasks.
"""
from __future__ import annotations

from typing import Protocol

import mujoco

# Bodies of the Franka Hand's fingers in the scene MJCF (`sim/model.py`).
FINGER_BODIES = ('fr3_leftfinger', 'fr3_rightfinger')


class Physics(Protocol):
    """A MuJoCo model and its data (poses, contacts), as `SimEnv` holds them."""

    model: mujoco.MjModel
    data: mujoco.MjData


def touching_fingers(physics: Physics, geom: str) -> bool:
    """Whether geom `geom` is in contact with a finger of the hand (a grasp, or a push)."""
    model, data = physics.model, physics.data
    gid = model.geom(geom).id
    fingers = {model.body(name).id for name in FINGER_BODIES}
    for contact in data.contact[:data.ncon]:
        a, b = int(contact.geom1), int(contact.geom2)
        if gid in (a, b) and (model.geom_bodyid[a] in fingers or model.geom_bodyid[b] in fingers):
            return True
    return False
