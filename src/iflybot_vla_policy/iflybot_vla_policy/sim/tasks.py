"""Language-conditioned table-top tasks: scene objects, seeded randomisation, success predicates.

Each task adds its objects to the MJCF once (`scene()`); `reset(env, rng)` moves and recolours
them (free joints through qpos, static bodies through model.body_pos/quat, colours through
geom_rgba), samples an instruction, and records what the scripted expert needs (`plan`). `env`
is anything holding the MuJoCo `model` and `data` (`sim/physics.Physics`; a `SimEnv` is one).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import mujoco
import numpy as np

from iflybot_vla_policy.sim.model import SceneSpec
from iflybot_vla_policy.sim.physics import Physics, touching_fingers

# Named colours (RGB 0..1); instructions refer to objects by these names.
COLORS: dict[str, tuple[float, float, float]] = {
    'red': (0.85, 0.1, 0.1), 'green': (0.1, 0.65, 0.2), 'blue': (0.1, 0.3, 0.9),
    'yellow': (0.95, 0.85, 0.1), 'orange': (1.0, 0.5, 0.05), 'purple': (0.55, 0.2, 0.75),
    'pink': (1.0, 0.5, 0.75), 'cyan': (0.1, 0.8, 0.85),
}
# Seeds: training data uses TRAIN_SEEDS, evaluation only EVAL_SEEDS (disjoint, held out).
TRAIN_SEEDS = range(0, 100_000)
EVAL_SEEDS = range(1_000_000, 1_100_000)

CUBE_HALF = 0.02           # m
PUCK_RADIUS = 0.03
PUCK_HALF_HEIGHT = 0.02
BOWL_INNER_HALF = 0.065    # m, inner half width of the square bowl
BOWL_WALL = 0.008
BOWL_HEIGHT = 0.045
ZONE_RADIUS = 0.06
DRAWER_TRAVEL = 0.2        # m
DRAWER_OPEN = 0.1          # m of travel that counts as open
REGION_MIN = np.array([0.38, -0.22])   # where objects are placed (x, y in m)
REGION_MAX = np.array([0.62, 0.22])


@dataclass(frozen=True)
class ObjectState:
    """Ground truth of one scene object (base frame)."""

    name: str                     # unique id in the scene, e.g. 'cube_a'
    kind: str                     # cube, bowl, puck, zone, drawer, cabinet
    color: str                    # a key of COLORS
    position: np.ndarray          # (3,) m
    quaternion: np.ndarray        # (4,) w, x, y, z
    size: np.ndarray              # (3,) half extents in m
    opening: float | None = None  # drawers: how far it is pulled out, m


# plan keys naming the acted-on object, then its destination (first present key wins)
GROUNDING_PLAN_KEYS = (('object', 'drawer'), ('container', 'base', 'goal', 'drawer'))


@dataclass
class TaskState:
    """Per-episode choices of a task: instruction, colours, and what the expert needs."""

    instruction: str = ''
    colors: dict[str, str] = field(default_factory=dict)   # object name -> colour name
    plan: dict[str, object] = field(default_factory=dict)


def _replace_word(text: str, old: str, new: str) -> str:
    """`old` as a whole word (one occurrence in our instructions) replaced by `new`."""
    result, count = re.subn(rf'\b{re.escape(old)}\b', new, text, count=1)
    if not count:
        raise ValueError(f'{old!r} is not a word of the instruction {text!r}')
    return result


def _free_body(name: str, geom: str, mass: float) -> str:
    return (f'<body name="{name}" pos="0.5 0 0.1"><freejoint name="{name}"/>'
            f'<geom name="{name}" class="object" {geom} mass="{mass}"/></body>')


def _cube(name: str) -> str:
    return _free_body(name, f'type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}"', 0.05)


def _yaw_quat(yaw: float) -> np.ndarray:
    return np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])


def _quat_yaw(quat: np.ndarray) -> float:
    w, x, y, z = quat
    return math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


def _sample_positions(rng: np.random.Generator, count: int, min_dist: float,
                      low: np.ndarray = REGION_MIN, high: np.ndarray = REGION_MAX,
                      fixed: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Rejection-sample xy positions at least min_dist apart (and from `fixed` ones)."""
    chosen: list[np.ndarray] = []
    others = list(fixed or [])
    for _ in range(10_000):
        p = rng.uniform(low, high)
        if all(np.linalg.norm(p - q) >= min_dist for q in chosen + others):
            chosen.append(p)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f'could not place {count} objects {min_dist} m apart')


class Task:
    """Base class: subclasses define objects, randomisation, instruction and success."""

    name = ''
    templates: tuple[str, ...] = ()
    grasps = True     # closing the gripper grasps the named object (push closes it to push)
    # Instruction variants of one scene: 0 is the drawn one; k > 0 names another object of
    # the same kind in the same scene (retarget), to measure whether the instruction matters.
    variants = 1

    def __init__(self) -> None:
        self.state = TaskState()

    def scene(self) -> SceneSpec:
        raise NotImplementedError

    def reset(self, env: Physics, rng: np.random.Generator) -> None:
        raise NotImplementedError

    def success(self, env: Physics) -> bool:
        raise NotImplementedError

    def objects(self, env: Physics) -> list[ObjectState]:
        raise NotImplementedError

    def retarget(self, env: Physics, variant: int) -> None:
        """After reset: make the instruction name another object of the scene (variant k of
        `variants`); the scene looks the same, what must happen changes."""
        if not 0 <= variant < self.variants:
            raise ValueError(f'task {self.name!r} has instruction variants 0..'
                             f'{self.variants - 1}, got {variant}')
        if variant:
            self._retarget(env, variant)

    def _retarget(self, env: Physics, variant: int) -> None:
        raise NotImplementedError

    def _swap_roles(self, env: Physics, target: str, other: str, geoms: dict[str, list[str]],
                    free: bool) -> None:
        """Exchange two same-shaped objects' poses and colours, so the picture is unchanged
        but `target` (the name the task logic acts on) is the object that was `other`; the
        instruction then names its colour."""
        if free:
            a, b = (env.model.joint(n).qposadr[0] for n in (target, other))
            qa = env.data.qpos[a:a + 7].copy()
            env.data.qpos[a:a + 7] = env.data.qpos[b:b + 7]
            env.data.qpos[b:b + 7] = qa
        else:
            a, b = env.model.body(target).id, env.model.body(other).id
            for field_ in (env.model.body_pos, env.model.body_quat):
                field_[[a, b]] = field_[[b, a]]
        colors = self.state.colors
        old, new = colors[target], colors[other]
        colors[target], colors[other] = new, old
        self._set_color(env, geoms[target], new)
        self._set_color(env, geoms[other], old)
        self.state.instruction = _replace_word(self.state.instruction, old, new)

    def grounding_points(self, env: Physics) -> np.ndarray:
        """(2, 3) base-frame positions of what the instruction names: the object to act on and
        where it goes (a drawer is both). Training targets for spatial grounding."""
        by_name = {o.name: o.position for o in self.objects(env)}
        plan = self.state.plan
        points = []
        for keys in GROUNDING_PLAN_KEYS:
            name = next(str(plan[k]) for k in keys if k in plan)
            points.append(np.asarray(by_name[name], dtype=np.float64))
        return np.stack(points)

    # helpers shared by the tasks
    @staticmethod
    def _colors(rng: np.random.Generator, count: int) -> list[str]:
        return [str(c) for c in rng.choice(list(COLORS), size=count, replace=False)]

    def _instruction(self, rng: np.random.Generator, **names: str) -> str:
        return self.templates[int(rng.integers(len(self.templates)))].format(**names)

    @staticmethod
    def _set_color(env: Physics, geom_names: list[str], color: str) -> None:
        for g in geom_names:
            env.model.geom_rgba[env.model.geom(g).id, :3] = COLORS[color]

    @staticmethod
    def _place_free(env: Physics, name: str, xy: np.ndarray, z: float, yaw: float) -> None:
        adr = env.model.joint(name).qposadr[0]
        env.data.qpos[adr:adr + 3] = [xy[0], xy[1], z]
        env.data.qpos[adr + 3:adr + 7] = _yaw_quat(yaw)
        dof = env.model.joint(name).dofadr[0]
        env.data.qvel[dof:dof + 6] = 0.0

    @staticmethod
    def _place_static(env: Physics, body: str, xy: np.ndarray, yaw: float) -> None:
        bid = env.model.body(body).id
        env.model.body_pos[bid, :2] = xy
        env.model.body_quat[bid] = _yaw_quat(yaw)

    @staticmethod
    def _free_state(env: Physics, name: str, kind: str, color: str,
                    size: tuple[float, ...]) -> ObjectState:
        adr = env.model.joint(name).qposadr[0]
        qpos = env.data.qpos[adr:adr + 7]
        return ObjectState(name, kind, color, qpos[:3].copy(), qpos[3:].copy(), np.array(size))

    @staticmethod
    def _static_state(env: Physics, body: str, kind: str, color: str,
                      size: tuple[float, ...]) -> ObjectState:
        bid = env.model.body(body).id
        return ObjectState(body, kind, color, env.data.xpos[bid].copy(),
                           env.data.xquat[bid].copy(), np.array(size))

    def _pos(self, env: Physics, name: str) -> np.ndarray:
        adr = env.model.joint(name).qposadr[0]
        return env.data.qpos[adr:adr + 3].copy()


class PickPlace(Task):
    """Put the named cube into the bowl; a second cube of another colour distracts."""

    name = 'pick_place'
    variants = 2      # 1: the other cube
    templates = ('put the {obj} in the {bowl}', 'place the {obj} into the {bowl}',
                 'pick up the {obj} and put it in the {bowl}', 'move the {obj} into the {bowl}',
                 'drop the {obj} in the {bowl}', 'put the {obj} inside the {bowl}')

    def scene(self) -> SceneSpec:
        h, w, t = BOWL_INNER_HALF, BOWL_WALL, BOWL_HEIGHT / 2
        walls = ''.join(
            f'<geom name="bowl_{i}" class="object" type="box" size="{sx} {sy} {t}" '
            f'pos="{px} {py} {t}"/>'
            for i, (sx, sy, px, py) in enumerate([(w, h + 2 * w, h + w, 0),
                                                  (w, h + 2 * w, -h - w, 0),
                                                  (h, w, 0, h + w), (h, w, 0, -h - w)]))
        bowl = (f'<body name="bowl" pos="0.5 0 0"><geom name="bowl_base" class="object" '
                f'type="box" size="{h} {h} 0.004" pos="0 0 0.004"/>{walls}</body>')
        return SceneSpec(worldbody=_cube('cube_a') + _cube('cube_b') + bowl)

    def _bowl_geoms(self) -> list[str]:
        return ['bowl_base'] + [f'bowl_{i}' for i in range(4)]

    def _retarget(self, env: Physics, variant: int) -> None:
        self._swap_roles(env, 'cube_a', 'cube_b', {'cube_a': ['cube_a'], 'cube_b': ['cube_b']},
                         free=True)

    def reset(self, env: Physics, rng: np.random.Generator) -> None:
        bowl_xy, a_xy, b_xy = _sample_positions(rng, 3, 0.15)
        obj_c, other_c, bowl_c = self._colors(rng, 3)
        self._place_static(env, 'bowl', bowl_xy, float(rng.uniform(-0.4, 0.4)))
        self._place_free(env, 'cube_a', a_xy, CUBE_HALF, float(rng.uniform(-np.pi, np.pi)))
        self._place_free(env, 'cube_b', b_xy, CUBE_HALF, float(rng.uniform(-np.pi, np.pi)))
        self._set_color(env, ['cube_a'], obj_c)
        self._set_color(env, ['cube_b'], other_c)
        self._set_color(env, self._bowl_geoms(), bowl_c)
        noun = str(rng.choice(['cube', 'block']))
        self.state = TaskState(
            self._instruction(rng, obj=f'{obj_c} {noun}', bowl=f'{bowl_c} bowl'),
            {'cube_a': obj_c, 'cube_b': other_c, 'bowl': bowl_c},
            {'object': 'cube_a', 'container': 'bowl'})

    def success(self, env: Physics) -> bool:
        bid = env.model.body('bowl').id
        rot = env.data.xmat[bid].reshape(3, 3)
        local = rot.T @ (self._pos(env, 'cube_a') - env.data.xpos[bid])
        inside = bool(np.all(np.abs(local[:2]) < BOWL_INNER_HALF - 0.005) and local[2] < 0.06)
        return inside and not touching_fingers(env, 'cube_a')

    def objects(self, env: Physics) -> list[ObjectState]:
        c = self.state.colors
        size = (CUBE_HALF,) * 3
        return [self._free_state(env, 'cube_a', 'cube', c['cube_a'], size),
                self._free_state(env, 'cube_b', 'cube', c['cube_b'], size),
                self._static_state(env, 'bowl', 'bowl', c['bowl'],
                                   (BOWL_INNER_HALF + 2 * BOWL_WALL,) * 2 + (BOWL_HEIGHT / 2,))]


class Stack(Task):
    """Stack the named cube on the other named cube; a third cube distracts."""

    name = 'stack'
    variants = 3      # 1: the third cube on the named base; 2: the named cube on the third
    templates = ('stack the {top} on the {base}', 'put the {top} on top of the {base}',
                 'place the {top} onto the {base}', 'pick up the {top} and stack it on the {base}',
                 'set the {top} on the {base}')

    def scene(self) -> SceneSpec:
        return SceneSpec(worldbody=_cube('cube_a') + _cube('cube_b') + _cube('cube_c'))

    def reset(self, env: Physics, rng: np.random.Generator) -> None:
        positions = _sample_positions(rng, 3, 0.11)
        colors = self._colors(rng, 3)
        for name, xy, color in zip(('cube_a', 'cube_b', 'cube_c'), positions, colors,
                                   strict=True):
            self._place_free(env, name, xy, CUBE_HALF, float(rng.uniform(-np.pi, np.pi)))
            self._set_color(env, [name], color)
        noun = str(rng.choice(['cube', 'block']))
        self.state = TaskState(
            self._instruction(rng, top=f'{colors[0]} {noun}', base=f'{colors[1]} {noun}'),
            dict(zip(('cube_a', 'cube_b', 'cube_c'), colors, strict=True)),
            {'object': 'cube_a', 'base': 'cube_b'})

    def _retarget(self, env: Physics, variant: int) -> None:
        role = 'cube_a' if variant == 1 else 'cube_b'
        self._swap_roles(env, role, 'cube_c', {n: [n] for n in ('cube_a', 'cube_b', 'cube_c')},
                         free=True)

    def success(self, env: Physics) -> bool:
        top, base = self._pos(env, 'cube_a'), self._pos(env, 'cube_b')
        aligned = np.linalg.norm(top[:2] - base[:2]) < 0.02
        on_top = 1.5 * CUBE_HALF < top[2] - base[2] < 2.5 * CUBE_HALF
        return bool(aligned and on_top and base[2] < 1.5 * CUBE_HALF
                    and not touching_fingers(env, 'cube_a'))

    def objects(self, env: Physics) -> list[ObjectState]:
        return [self._free_state(env, n, 'cube', self.state.colors[n], (CUBE_HALF,) * 3)
                for n in ('cube_a', 'cube_b', 'cube_c')]


class Push(Task):
    """Push the puck onto the target zone of the named colour; a second zone distracts."""

    name = 'push'
    grasps = False
    variants = 2      # 1: to the other zone
    templates = ('push the {obj} to the {zone}', 'slide the {obj} onto the {zone}',
                 'push the {obj} into the {zone}', 'move the {obj} to the {zone} by pushing it',
                 'shove the {obj} onto the {zone}')

    def scene(self) -> SceneSpec:
        puck = _free_body('puck', f'type="cylinder" size="{PUCK_RADIUS} {PUCK_HALF_HEIGHT}"',
                          0.08)
        zones = ''.join(
            f'<body name="{z}" pos="0.5 0 0"><geom name="{z}" type="cylinder" '
            f'size="{ZONE_RADIUS} 0.0005" pos="0 0 0.0005" contype="0" conaffinity="0"/></body>'
            for z in ('zone_a', 'zone_b'))
        return SceneSpec(worldbody=puck + zones)

    def reset(self, env: Physics, rng: np.random.Generator) -> None:
        for _ in range(1000):
            puck_xy = rng.uniform([0.42, -0.15], [0.56, 0.15])
            angle = rng.uniform(-np.pi, np.pi)
            goal_xy = puck_xy + rng.uniform(0.12, 0.2) * np.array([np.cos(angle), np.sin(angle)])
            if np.all(goal_xy > REGION_MIN - [0.03, 0.03]) and np.all(goal_xy < REGION_MAX):
                break
        other_xy = _sample_positions(rng, 1, 0.15, fixed=[puck_xy, goal_xy])[0]
        obj_c, zone_c, other_c = self._colors(rng, 3)
        self._place_free(env, 'puck', puck_xy, PUCK_HALF_HEIGHT, 0.0)
        self._place_static(env, 'zone_a', goal_xy, 0.0)
        self._place_static(env, 'zone_b', other_xy, 0.0)
        self._set_color(env, ['puck'], obj_c)
        self._set_color(env, ['zone_a'], zone_c)
        self._set_color(env, ['zone_b'], other_c)
        obj = f'{obj_c} {rng.choice(["puck", "disc"])}'
        zone = f'{zone_c} {rng.choice(["circle", "target", "zone"])}'
        self.state = TaskState(self._instruction(rng, obj=obj, zone=zone),
                               {'puck': obj_c, 'zone_a': zone_c, 'zone_b': other_c},
                               {'object': 'puck', 'goal': 'zone_a'})

    def _retarget(self, env: Physics, variant: int) -> None:
        self._swap_roles(env, 'zone_a', 'zone_b', {'zone_a': ['zone_a'], 'zone_b': ['zone_b']},
                         free=False)

    def goal_xy(self, env: Physics) -> np.ndarray:
        return env.data.xpos[env.model.body('zone_a').id][:2].copy()

    def success(self, env: Physics) -> bool:
        return bool(np.linalg.norm(self._pos(env, 'puck')[:2] - self.goal_xy(env))
                    < ZONE_RADIUS - 0.01)

    def objects(self, env: Physics) -> list[ObjectState]:
        c = self.state.colors
        return [self._free_state(env, 'puck', 'puck', c['puck'],
                                 (PUCK_RADIUS, PUCK_RADIUS, PUCK_HALF_HEIGHT)),
                self._static_state(env, 'zone_a', 'zone', c['zone_a'],
                                   (ZONE_RADIUS, ZONE_RADIUS, 0.0005)),
                self._static_state(env, 'zone_b', 'zone', c['zone_b'],
                                   (ZONE_RADIUS, ZONE_RADIUS, 0.0005))]


# Cabinet geometry (cabinet frame: front face towards -x, i.e. towards the robot).
CAB_DEPTH, CAB_WIDTH, CAB_HEIGHT = 0.2, 0.36, 0.12     # outer size, m
DRAWER_WIDTH, DRAWER_HEIGHT = 0.16, 0.085
HANDLE_STANDOFF = 0.05      # post axis in front of the drawer front, m
HANDLE_Z = (0.05, 0.11)     # post bottom and top, m
HANDLE_RADIUS = 0.01


class Drawer(Task):
    """Open the drawer whose handle has the named colour (two drawers side by side)."""

    name = 'drawer'
    variants = 2      # 1: the other drawer
    templates = ('open the {drawer}', 'pull the {drawer} open', 'pull out the {drawer}',
                 'slide the {drawer} open', 'open the {drawer} of the cabinet')

    def scene(self) -> SceneSpec:
        d, w, h = CAB_DEPTH / 2, CAB_WIDTH / 2, CAB_HEIGHT
        t = 0.008
        carcass = ''.join(
            f'<geom class="cabinet" type="box" size="{sx} {sy} {sz}" pos="{px} {py} {pz}"/>'
            for sx, sy, sz, px, py, pz in [
                (d, w, t, 0, 0, h - t),                # top
                (d, t, h / 2, 0, w - t, h / 2),        # sides
                (d, t, h / 2, 0, -w + t, h / 2),
                (d, t, h / 2 - t, 0, 0, h / 2),        # middle divider
                (t, w, h / 2, d - t, 0, h / 2)])       # back
        drawers = ''.join(self._drawer_xml(name, y) for name, y in
                          (('drawer_left', -w / 2), ('drawer_right', w / 2)))
        return SceneSpec(
            worldbody=f'<body name="cabinet" pos="0.7 0 0">{carcass}{drawers}</body>')

    @staticmethod
    def _drawer_xml(name: str, y: float) -> str:
        d = CAB_DEPTH / 2 - 0.01
        hw, hh, t = DRAWER_WIDTH / 2 - 0.003, DRAWER_HEIGHT / 2, 0.006
        z0 = 0.01
        front_x = -CAB_DEPTH / 2 - t
        post_x = front_x - HANDLE_STANDOFF
        zc = (HANDLE_Z[0] + HANDLE_Z[1]) / 2
        parts = [
            (t, hw + 0.004, hh + 0.004, front_x, 0, z0 + hh),   # front plate
            (d, hw, t / 2, 0, 0, z0 + t / 2),                   # bottom
            (d, t / 2, hh, 0, hw - t / 2, z0 + hh),             # sides
            (d, t / 2, hh, 0, -hw + t / 2, z0 + hh),
            (t / 2, hw, hh, d - t / 2, 0, z0 + hh)]             # back
        geoms = ''.join(
            f'<geom class="drawer" type="box" size="{sx} {sy} {sz}" pos="{px} {py} {pz}"/>'
            for sx, sy, sz, px, py, pz in parts)
        arm_len = (front_x - t - post_x) / 2
        handle = (f'<geom name="{name}_arm" class="handle" type="box" '
                  f'size="{arm_len} 0.006 0.006" pos="{post_x + arm_len} 0 {HANDLE_Z[0]}"/>'
                  f'<geom name="{name}_post" class="handle" type="cylinder" '
                  f'size="{HANDLE_RADIUS} {(HANDLE_Z[1] - HANDLE_Z[0]) / 2}" '
                  f'pos="{post_x} 0 {zc}"/>'
                  f'<site name="{name}_handle" pos="{post_x} 0 {zc}" size="0.005" group="4"/>')
        return (f'<body name="{name}" pos="0 {y} 0"><joint name="{name}" type="slide" '
                f'axis="-1 0 0" range="0 {DRAWER_TRAVEL}" damping="8" frictionloss="0.5" '
                f'armature="0.05"/>{geoms}{handle}</body>')

    def reset(self, env: Physics, rng: np.random.Generator) -> None:
        xy = rng.uniform([0.68, -0.12], [0.74, 0.12])
        yaw = float(rng.uniform(-0.35, 0.35))
        self._place_static(env, 'cabinet', xy, yaw)
        for name in ('drawer_left', 'drawer_right'):
            env.data.qpos[env.model.joint(name).qposadr[0]] = 0.0
        left_c, right_c = self._colors(rng, 2)
        self._set_color(env, ['drawer_left_arm', 'drawer_left_post'], left_c)
        self._set_color(env, ['drawer_right_arm', 'drawer_right_post'], right_c)
        target = str(rng.choice(['drawer_left', 'drawer_right']))
        color = left_c if target == 'drawer_left' else right_c
        side = 'left' if target == 'drawer_left' else 'right'
        # 'left'/'right' as seen from the robot (the left drawer is at negative cabinet y, which
        # faces the robot, so it is on the robot's right); name by colour, sometimes by side.
        side = 'right' if side == 'left' else 'left'
        phrases = [f'{color} drawer', f'drawer with the {color} handle', f'{side} drawer']
        phrase = phrases[int(rng.integers(len(phrases)))]
        self.state = TaskState(self._instruction(rng, drawer=phrase),
                               {'drawer_left': left_c, 'drawer_right': right_c,
                                'cabinet': 'beige'},
                               {'drawer': target, 'yaw': yaw})

    def _retarget(self, env: Physics, variant: int) -> None:
        """The other drawer, named the way the drawn instruction named its target (by colour
        or by side)."""
        plan, colors = self.state.plan, self.state.colors
        target = str(plan['drawer'])
        other = 'drawer_right' if target == 'drawer_left' else 'drawer_left'
        text = self.state.instruction
        if re.search(rf'\b{colors[target]}\b', text):
            text = _replace_word(text, colors[target], colors[other])
        else:
            side = re.search(r'\b(left|right)\b', text).group(1)
            text = _replace_word(text, side, 'right' if side == 'left' else 'left')
        plan['drawer'] = other
        self.state.instruction = text

    def opening(self, env: Physics, name: str) -> float:
        return float(env.data.qpos[env.model.joint(name).qposadr[0]])

    def success(self, env: Physics) -> bool:
        return self.opening(env, str(self.state.plan['drawer'])) > DRAWER_OPEN

    def objects(self, env: Physics) -> list[ObjectState]:
        out = [self._static_state(env, 'cabinet', 'cabinet', 'beige',
                                  (CAB_DEPTH / 2, CAB_WIDTH / 2, CAB_HEIGHT / 2))]
        for name in ('drawer_left', 'drawer_right'):
            sid = env.model.site(f'{name}_handle').id
            quat = np.zeros(4)
            mujoco.mju_mat2Quat(quat, env.data.site_xmat[sid])
            out.append(ObjectState(name, 'drawer', self.state.colors[name],
                                   env.data.site_xpos[sid].copy(), quat,
                                   np.array([CAB_DEPTH / 2, DRAWER_WIDTH / 2, DRAWER_HEIGHT / 2]),
                                   opening=self.opening(env, name)))
        return out


TASKS: dict[str, type[Task]] = {t.name: t for t in (PickPlace, Stack, Push, Drawer)}


def make_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f'unknown task {name!r}; choose from {sorted(TASKS)}')
    return TASKS[name]()
