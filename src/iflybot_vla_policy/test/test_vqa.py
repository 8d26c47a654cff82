"""Spatial VQA from the simulator: every answer is checked against the simulated scene itself.

Relations are checked in the rendered scene image (segmentation masks from MuJoCo's renderer,
an independent path from the projection math in data/vqa.py), positions against the poses.
"""
from __future__ import annotations

import mujoco
import numpy as np
import pytest

from iflybot_vla_policy.data import vqa
from iflybot_vla_policy.sim.env import make_env


def _object_of_geom(env, names: set[str]) -> dict[int, str]:
    """geom id -> name of the scene object whose body (or an ancestor) carries it."""
    out = {}
    for g in range(env.model.ngeom):
        body = int(env.model.geom_bodyid[g])
        while body > 0:
            name = env.model.body(body).name
            if name in names:
                out[g] = name
                break
            body = int(env.model.body_parentid[body])
    return out


def _centroids(env, objects) -> dict[str, np.ndarray]:
    """Pixel centroid (u, v) of each object's visible pixels in the scene camera's image."""
    h, w = env.camera_sizes['scene_camera']
    renderer = mujoco.Renderer(env.model, h, w)
    renderer.enable_segmentation_rendering()
    renderer.update_scene(env.data, camera='scene_camera')
    seg = renderer.render()                                     # (H, W, 2): id, type
    renderer.close()
    owner = _object_of_geom(env, {o.name for o in objects})
    geom = seg[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM)
    out = {}
    for name in {o.name for o in objects}:
        ids = [g for g, n in owner.items() if n == name]
        mask = geom & np.isin(seg[..., 0], ids)
        if mask.sum() >= 5:
            v, u = np.nonzero(mask)
            out[name] = np.array([u.mean(), v.mean()])
    return out


@pytest.mark.parametrize('task', ['pick_place', 'stack', 'push', 'drawer'])
def test_answers_match_the_simulated_scene(task):
    rng = np.random.default_rng(0)
    checked = {k: 0 for k in vqa.KINDS}
    env = make_env(task, seed=0, image_size=(160, 160))
    try:
        for seed in range(4):
            env.reset(seed)
            objects = vqa.scene_objects(env)
            by_phrase = {vqa.phrase(o): o for o in objects}
            centroid = _centroids(env, objects)
            for qa in vqa.questions(objects, vqa.scene_view(env), rng, 12):
                if qa.kind == 'relation':
                    words = qa.question.removeprefix('is ').removesuffix('?')
                    rel = next(r for r in vqa.RELATIONS if f' {r} ' in words)
                    a, b = (by_phrase[p] for p in words.split(f' {rel} '))
                    if rel in ('left of', 'right of'):
                        if a.name not in centroid or b.name not in centroid:
                            continue
                        du = centroid[a.name][0] - centroid[b.name][0]
                        truth = du < 0 if rel == 'left of' else du > 0
                    else:   # horizontal distance to the camera body
                        cam = env.data.cam_xpos[env.model.camera('scene_camera').id][:2]
                        da, db = (np.linalg.norm(o.position[:2] - cam) for o in (a, b))
                        truth = da < db if rel == 'in front of' else da > db
                    assert qa.answer == ('yes' if truth else 'no'), (seed, qa)
                elif qa.kind == 'where':
                    obj = by_phrase[qa.question.removeprefix('where is ').removesuffix('?')]
                    i, j = vqa.parse_grid_answer(qa.answer)
                    lo = vqa.GRID_MIN + (vqa.GRID_MAX - vqa.GRID_MIN) * np.array([i, j]) / 5
                    hi = lo + (vqa.GRID_MAX - vqa.GRID_MIN) / 5
                    assert np.all(obj.position[:2] >= lo) and np.all(obj.position[:2] < hi), qa
                elif qa.kind == 'colour':
                    kind = qa.question.removeprefix('what colour is the ').removesuffix('?')
                    assert [o.color for o in objects if o.kind == kind] == [qa.answer]
                elif qa.kind == 'count':
                    kind = qa.question.removeprefix('how many ').split('s are')[0]
                    n = sum(o.kind == kind for o in objects)
                    assert qa.answer == vqa.NUMBERS[n]
                elif qa.kind == 'nearest':
                    nearest = min(objects, key=lambda o: np.linalg.norm(o.position[:2]))
                    assert qa.answer == vqa.phrase(nearest)
                elif qa.kind == 'which':
                    rel = next(r for r in vqa.RELATIONS if f'is {r} ' in qa.question)
                    b = by_phrase[qa.question.split(f'is {rel} ')[1].removesuffix('?')]
                    a = by_phrase[qa.answer]
                    if rel in ('left of', 'right of') and a.name in centroid \
                            and b.name in centroid:
                        du = centroid[a.name][0] - centroid[b.name][0]
                        assert (du < 0) == (rel == 'left of'), qa
                checked[qa.kind] += 1
    finally:
        env.close()
    assert checked['relation'] + checked['which'] >= 3
    assert checked['where'] >= 2


def test_relations_too_close_to_call_are_not_asked():
    view = vqa.CameraView(np.array([1.35, 0.0, 0.75]), np.array(
        [[0.0, -0.6, 0.8], [1.0, 0.0, 0.0], [0.0, 0.8, 0.6]]))
    a = vqa.SceneObject('a', 'cube', 'red', np.array([0.5, 0.0, 0.02]))
    b = vqa.SceneObject('b', 'cube', 'blue', np.array([0.5, 0.01, 0.02]))
    assert vqa.relation_holds(a, b, 'left of', view) is None
    assert vqa.questions([a, b], view, np.random.default_rng(0), 20)  # other kinds still asked
    assert all(q.kind != 'relation' for q in vqa.questions([a, b], view,
                                                           np.random.default_rng(0), 20))
