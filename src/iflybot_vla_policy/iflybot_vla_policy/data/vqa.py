"""Spatial VQA generated from the simulator's ground truth, mixed into VLA training batches.

The paper keeps ~7% of every batch for (mostly spatial) VQA to keep the VLM grounded; we have no
VQA corpus, but the simulator knows where everything is. For a reset scene we render the
cameras the policy sees and ask questions whose answers follow from the objects' poses:

- relations, as seen in the scene camera image: 'is the red cube left of the blue bowl?'
  (left/right = image left/right; 'in front of' = closer to the scene camera, 'behind' =
  farther); 'which object is right of the green cube?' when exactly one is;
- where an object is, discretised on a grid over the table in the robot base frame:
  'where is the red cube?' -> 'x 2 y 4' (x: distance from the robot, y: towards its left);
- colours, counts and the object nearest the robot.

Pairs closer than a margin are never asked about, so every answer is unambiguous.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RELATIONS = ('left of', 'right of', 'in front of', 'behind')
GRID_BINS = 5                                   # 'where' answers: x and y bins each
GRID_MIN = np.array([0.3, -0.3])                # m, base frame, the table region binned
GRID_MAX = np.array([0.7, 0.3])
MARGIN = 0.03         # relations closer than this (m, or focal units ~ m at 1 m) are not asked
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
KINDS = ('relation', 'which', 'where', 'colour', 'count', 'nearest')


@dataclass(frozen=True)
class SceneObject:
    """What VQA needs of a simulator object (`sim.tasks.ObjectState` has these fields)."""

    name: str
    kind: str
    color: str
    position: np.ndarray          # (3,) m, base frame


@dataclass(frozen=True)
class CameraView:
    """The scene camera's pose (base frame) in MuJoCo's convention: x right, y up, looks -z."""

    position: np.ndarray          # (3,) m
    rotation: np.ndarray          # (3, 3) columns: image right, image up, backwards

    def image_x(self, point: np.ndarray) -> float:
        """Horizontal image coordinate of a point, in units of focal length (right > 0)."""
        c = self.rotation.T @ (np.asarray(point, float) - self.position)
        return float(c[0] / max(-c[2], 1e-6))

    def distance(self, point: np.ndarray) -> float:
        """Horizontal distance from the camera, m."""
        return float(np.linalg.norm(np.asarray(point, float)[:2] - self.position[:2]))


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str                     # one of KINDS


def phrase(obj: SceneObject) -> str:
    return f'the {obj.color} {obj.kind}'


def relation_holds(a: SceneObject, b: SceneObject, relation: str,
                   view: CameraView) -> bool | None:
    """Whether `a` is `relation` `b` as the scene camera sees it; None when too close to call.

    left/right: where the object centres project in the image; in front of/behind: horizontal
    distance from the camera (in front = closer).
    """
    if relation in ('left of', 'right of'):
        s = view.image_x(a.position) - view.image_x(b.position)
        value = s < 0 if relation == 'left of' else s > 0
    elif relation in ('in front of', 'behind'):
        s = view.distance(b.position) - view.distance(a.position)
        value = s > 0 if relation == 'in front of' else s < 0
    else:
        raise ValueError(f'unknown relation {relation!r}; choose from {RELATIONS}')
    return None if abs(s) < MARGIN else value


def grid_cell(position: np.ndarray) -> tuple[int, int] | None:
    """(x bin, y bin) of a base-frame position, None outside the binned region."""
    frac = (np.asarray(position[:2], float) - GRID_MIN) / (GRID_MAX - GRID_MIN)
    if np.any(frac < 0) or np.any(frac >= 1):
        return None
    i, j = (frac * GRID_BINS).astype(int)
    return int(i), int(j)


def parse_grid_answer(answer: str) -> tuple[int, int]:
    """'x 2 y 4' -> (2, 4)."""
    parts = answer.split()
    if len(parts) != 4 or parts[0] != 'x' or parts[2] != 'y':
        raise ValueError(f"not a grid answer: {answer!r} (expected 'x I y J')")
    return int(parts[1]), int(parts[3])


def _unique(objects: Sequence[SceneObject]) -> list[SceneObject]:
    """Objects that `phrase` names unambiguously."""
    counts: dict[str, int] = {}
    for o in objects:
        counts[phrase(o)] = counts.get(phrase(o), 0) + 1
    return [o for o in objects if counts[phrase(o)] == 1]


def questions(objects: Sequence[SceneObject], view: CameraView, rng: np.random.Generator,
              count: int) -> list[QA]:
    """Up to `count` distinct question/answer pairs about one scene (fewer if it is simple)."""
    named = _unique(objects)
    makers: list[Callable[[], QA | None]] = [
        lambda: _relation(named, view, rng), lambda: _which(named, view, rng),
        lambda: _where(named, rng), lambda: _colour(objects, rng),
        lambda: _count(objects, rng), lambda: _nearest(named)]
    weights = np.array([0.3, 0.15, 0.25, 0.1, 0.1, 0.1])
    out: dict[str, QA] = {}
    for _ in range(count * 10):
        if len(out) >= count:
            break
        qa = makers[int(rng.choice(len(makers), p=weights))]()
        if qa is not None:
            out.setdefault(qa.question, qa)
    return list(out.values())


def _relation(named: list[SceneObject], view: CameraView, rng: np.random.Generator) -> QA | None:
    if len(named) < 2:
        return None
    i, j = rng.choice(len(named), size=2, replace=False)
    a, b = named[int(i)], named[int(j)]
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    holds = relation_holds(a, b, relation, view)
    if holds is None:
        return None
    return QA(f'is {phrase(a)} {relation} {phrase(b)}?', 'yes' if holds else 'no', 'relation')


def _which(named: list[SceneObject], view: CameraView, rng: np.random.Generator) -> QA | None:
    if len(named) < 2:
        return None
    b = named[int(rng.integers(len(named)))]
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    verdicts = [relation_holds(a, b, relation, view) for a in named if a is not b]
    if any(v is None for v in verdicts) or sum(bool(v) for v in verdicts) != 1:
        return None
    others = [a for a in named if a is not b]
    match = others[[bool(v) for v in verdicts].index(True)]
    return QA(f'which object is {relation} {phrase(b)}?', phrase(match), 'which')


def _where(named: list[SceneObject], rng: np.random.Generator) -> QA | None:
    if not named:
        return None
    obj = named[int(rng.integers(len(named)))]
    cell = grid_cell(obj.position)
    if cell is None:
        return None
    return QA(f'where is {phrase(obj)}?', f'x {cell[0]} y {cell[1]}', 'where')


def _colour(objects: Sequence[SceneObject], rng: np.random.Generator) -> QA | None:
    kinds: dict[str, list[SceneObject]] = {}
    for o in objects:
        kinds.setdefault(o.kind, []).append(o)
    single = [v[0] for v in kinds.values() if len(v) == 1]
    if not single:
        return None
    obj = single[int(rng.integers(len(single)))]
    return QA(f'what colour is the {obj.kind}?', obj.color, 'colour')


def _count(objects: Sequence[SceneObject], rng: np.random.Generator) -> QA | None:
    kinds = sorted({o.kind for o in objects})
    if not kinds:
        return None
    kind = kinds[int(rng.integers(len(kinds)))]
    n = sum(o.kind == kind for o in objects)
    return QA(f'how many {kind}s are on the table?', NUMBERS[n] if n < 10 else str(n), 'count')


def _nearest(named: list[SceneObject]) -> QA | None:
    if len(named) < 2:
        return None
    dist = sorted((float(np.linalg.norm(o.position[:2])), k) for k, o in enumerate(named))
    if dist[1][0] - dist[0][0] < MARGIN:
        return None
    return QA('which object is closest to the robot?', phrase(named[dist[0][1]]), 'nearest')


# ------------------------------------------------------------------------------ from the sim

@dataclass
class VQAScene:
    """One rendered simulator scene and its questions."""

    task: str
    seed: int
    images: dict[str, np.ndarray]     # camera -> (H, W, 3) uint8
    state: np.ndarray                 # (8,) float32, robot state at the rendered instant
    objects: list[SceneObject]
    qas: list[QA]


def scene_objects(env: object) -> list[SceneObject]:
    """The env's ground truth (`env.objects()`), reduced to what VQA asks about."""
    return [SceneObject(o.name, o.kind, o.color, np.asarray(o.position, float))
            for o in env.objects()]


def scene_view(env: object, camera: str = 'scene_camera') -> CameraView:
    """Pose of the env's scene camera (MuJoCo data after mj_forward)."""
    cam = env.model.camera(camera).id
    return CameraView(env.data.cam_xpos[cam].copy(), env.data.cam_xmat[cam].reshape(3, 3).copy())


def render_scenes(tasks: Sequence[str], seeds: Sequence[int], per_scene: int,
                  image_size: tuple[int, int] = (224, 224), seed: int = 0) -> list[VQAScene]:
    """Reset one env per task at each seed (tasks taken in turn), render both cameras and ask
    `per_scene` questions about what the scene camera sees."""
    from iflybot_vla_policy.sim.env import make_env

    envs: dict[str, object] = {}
    rng = np.random.default_rng(seed)
    scenes = []
    try:
        for k, scene_seed in enumerate(seeds):
            task = tasks[k % len(tasks)]
            if task not in envs:
                envs[task] = make_env(task, seed=int(scene_seed), image_size=image_size)
            else:
                envs[task].reset(int(scene_seed))
            env = envs[task]
            objects = scene_objects(env)
            qas = questions(objects, scene_view(env), rng, per_scene)
            obs = env.observe()
            scenes.append(VQAScene(task, int(scene_seed), obs['images'], obs['state'], objects,
                                   qas))
    finally:
        for env in envs.values():
            env.close()
    return scenes
