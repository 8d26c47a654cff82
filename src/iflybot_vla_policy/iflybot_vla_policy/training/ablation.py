"""The paper's ablation on our data: flow only, + FAST, + LAM, full (+ spatial VQA).

Every variant trains from scratch on the same data with the same steps, batch and seed (only the
auxiliary targets differ), then is scored the same way: offline on held-out demonstrations (the
error of a sampled chunk against the expert's next actions, averaged per episode, with a
bootstrap 95% CI over episodes) and, when asked, in closed loop on held-out simulator seeds
(success with a Wilson 95% CI). Offline error is what a short CPU budget can resolve; success
needs the long run.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iflybot_vla_policy.training.config import TrainConfig


@dataclass(frozen=True)
class Variant:
    label: str
    model_overrides: dict[str, Any]
    vqa: bool                     # keep the base config's spatial-VQA share


_NO_FAST = {'tokens.fast_vocab': 0, 'loss.fast_weight': 0.0}
_NO_LAM = {'tokens.latent_tokens': 0, 'loss.latent_weight': 0.0}
_NO_GROUND = {'loss.grounding_weight': 0.0}   # the paper's four, whatever the base config says
VARIANTS: dict[str, Variant] = {
    'flow': Variant('flow matching only', {**_NO_FAST, **_NO_LAM, **_NO_GROUND}, vqa=False),
    'flow+fast': Variant('+ FAST token CE', {**_NO_LAM, **_NO_GROUND}, vqa=False),
    'flow+lam': Variant('+ latent-action CE', {**_NO_FAST, **_NO_GROUND}, vqa=False),
    'full': Variant('flow + FAST + latent + spatial VQA', dict(_NO_GROUND), vqa=True),
    'flow+ground': Variant('flow + grounding head (object and goal positions)',
                           {**_NO_FAST, **_NO_LAM, 'loss.grounding_weight': 1.0}, vqa=False),
}
DEFAULT_VARIANTS = ('flow', 'flow+fast', 'flow+lam', 'full')   # the paper's four


@dataclass(frozen=True)
class AblationConfig:
    base: TrainConfig                         # a vla-stage config: data, model, trainer
    out: Path                                 # one output_dir per variant, plus the tables
    heldout: tuple[str, ...]                  # held-out LeRobot datasets for the offline score
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    steps: int = 300
    frame_stride: int = 5                     # score every k-th frame of each episode
    episodes: int = 0                         # closed-loop episodes per task (0 = skip)
    tasks: tuple[str, ...] = ('pick_place',)
    image_size: int = 128                     # closed loop: rendered camera size
    seed: int = 0                             # sampler seed of the scored policies
    bootstrap_resamples: int = 2000

    def __post_init__(self) -> None:
        if self.base.stage != 'vla':
            raise ValueError(f"the ablation needs a 'vla' stage config, got '{self.base.stage}'")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f'unknown variant(s) {unknown}; choose from {list(VARIANTS)}')
        if not self.heldout:
            raise ValueError('heldout: name at least one held-out dataset')
        for name in ('steps', 'frame_stride'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')


def variant_config(base: TrainConfig, name: str, steps: int, out: Path) -> TrainConfig:
    """The base vla config with one variant's targets, its own output_dir and `steps`."""
    v = VARIANTS[name]
    data = base.data if v.vqa else dataclasses.replace(base.data, vqa_ratio=0.0)
    trainer = dataclasses.replace(base.trainer, steps=steps, max_steps_per_run=0,
                                  checkpoint_every=min(base.trainer.checkpoint_every, steps))
    return dataclasses.replace(base, output_dir=str(out / name), data=data, trainer=trainer,
                               model_overrides={**base.model_overrides, **v.model_overrides})


def bootstrap_ci(values: Sequence[float], resamples: int = 2000, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean (a point interval for fewer than 2 values)."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2 or np.all(x == x[0]):
        m = float(x.mean()) if len(x) else float('nan')
        return m, m
    res = bootstrap((x,), np.mean, n_resamples=resamples, method='percentile',
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass(frozen=True)
class HeldoutEpisode:
    """The scored frames of one held-out episode, decoded once for every variant."""

    images: dict[str, np.ndarray]     # camera -> (n, H, W, 3) uint8
    states: np.ndarray                # (n, 8)
    instructions: list[str]           # (n,)
    targets: np.ndarray               # (n, horizon, 8) the expert's next actions
    grounding: np.ndarray | None = None       # (2, 3) m: named object and goal at the start
    grounding_mask: np.ndarray | None = None  # (n,) bool: frames before the first grasp


def heldout_episodes(datasets: Sequence[Any], cameras: Sequence[str], horizon: int,
                     stride: int, grounding: bool = False) -> list[HeldoutEpisode]:
    """Every `stride`-th frame of every episode, with the chunk the expert executed from it
    (and, with `grounding`, where the named object and its goal are, rebuilt from the seed)."""
    from iflybot_vla_policy.training.grounding import episode_grounding

    out = []
    for ds in datasets:
        truth = episode_grounding(ds) if grounding else None
        for e in range(ds.num_episodes):
            start, stop = ds.episode_range(e)
            arrays = ds.episode_arrays(e)
            state, action = arrays['observation.state'], arrays['action']   # (T, 8) each
            frames = np.arange(0, stop - start, stride)
            rows = np.minimum(frames[:, None] + np.arange(horizon), len(action) - 1)
            points = mask = None
            if truth is not None and truth.known[e]:
                points = truth.points[e]
                mask = truth.frame_mask(np.full(len(frames), e), start + frames)
            out.append(HeldoutEpisode(
                images={c: ds.images(c, start + frames) for c in cameras},
                states=state[frames], targets=action[rows],
                instructions=[ds.instruction(start + int(t)) for t in frames],
                grounding=points, grounding_mask=mask))
    return out


def hold_errors(episodes: Sequence[HeldoutEpisode]) -> list[float]:
    """Per episode: arm error (rad) of the trivial chunk that keeps the current joints, the
    bar a useful policy must clear."""
    return [float(np.abs(ep.states[:, None, :7] - ep.targets[..., :7]).mean())
            for ep in episodes]


def offline_errors(policy: Any, episodes: Sequence[HeldoutEpisode], seed: int = 0,
                   batch: int = 16) -> dict[str, list[float]]:
    """Per held-out episode: mean |sampled chunk - expert's next actions| over the chunk,
    arm joints in rad ('arm') and gripper width in m ('gripper')."""
    arm, grip = [], []
    for ep in episodes:
        diffs = []
        for b in range(0, len(ep.states), batch):
            rows = range(b, min(b + batch, len(ep.states)))
            obs = [{'images': {c: v[i] for c, v in ep.images.items()}, 'state': ep.states[i],
                    'instruction': ep.instructions[i]} for i in rows]
            pred = policy.infer_batch(obs, seed=seed)['actions']            # (n, horizon, 8)
            diffs.append(np.abs(pred[..., :8] - ep.targets[b:b + batch]))
        diff = np.concatenate(diffs)                                         # (n, horizon, 8)
        arm.append(float(diff[..., :7].mean()))
        grip.append(float(diff[..., 7].mean()))
    out = {'arm': arm, 'gripper': grip}
    if getattr(policy, 'has_grounding', False):
        out.update(grounding_errors(policy, episodes, batch))
    return out


def grounding_errors(policy: Any, episodes: Sequence[HeldoutEpisode], batch: int = 16
                     ) -> dict[str, list[float]]:
    """Per held-out episode with a target: mean distance (m) between where the grounding head
    puts the named object ('object') and its goal ('goal') and where they are, over the frames
    before the first grasp."""
    obj, goal = [], []
    for ep in episodes:
        if ep.grounding is None or ep.grounding_mask is None or not ep.grounding_mask.any():
            continue
        idx = np.nonzero(ep.grounding_mask)[0]
        preds = []
        for b in range(0, len(idx), batch):
            obs = [{'images': {c: v[i] for c, v in ep.images.items()}, 'state': ep.states[i],
                    'instruction': ep.instructions[i]} for i in idx[b:b + batch]]
            preds.append(policy.ground(obs))
        dist = np.linalg.norm(np.concatenate(preds) - ep.grounding[None], axis=-1)  # (n, 2)
        obj.append(float(dist[:, 0].mean()))
        goal.append(float(dist[:, 1].mean()))
    return {'object': obj, 'goal': goal}


def closed_loop(policy: Any, tasks: Sequence[str], episodes: int, image_size: int
                ) -> dict[str, dict[str, Any]]:
    """Success per task over the first `episodes` held-out simulator seeds."""
    from iflybot_vla_policy.eval.metrics import wilson_interval
    from iflybot_vla_policy.eval.rollout import RolloutConfig, eval_seeds, run_episode
    from iflybot_vla_policy.robot import load_robot
    from iflybot_vla_policy.safety import SafetyFilter

    safety = SafetyFilter(load_robot())
    config = RolloutConfig(image_size=(image_size, image_size))
    out = {}
    for task in tasks:
        wins = sum(bool(run_episode(policy, task, seed, config, safety).success)
                   for seed in eval_seeds(episodes))
        out[task] = {'successes': wins, 'episodes': episodes,
                     'success_ci95': list(wilson_interval(wins, episodes))}
    return out


def run_ablation(cfg: AblationConfig,
                 train: Callable[[TrainConfig], dict[str, Any]] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) every variant, score it, write ablation.json and ablation.md."""
    from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset
    from iflybot_vla_policy.policy import Policy
    from iflybot_vla_policy.training.vla_stage import POLICY_DIR, run_vla

    train = train or run_vla
    datasets = [LeRobotDataset(cfg.base.resolve(p)) for p in cfg.heldout]
    cfg.out.mkdir(parents=True, exist_ok=True)
    episodes: list[HeldoutEpisode] = []
    rows = {}
    for name in cfg.variants:
        vcfg = variant_config(cfg.base, name, cfg.steps, cfg.out)
        log(f'[ablation] {name}: training {cfg.steps} steps into {vcfg.output_dir}')
        t0 = time.monotonic()
        summary = train(vcfg)
        train_s = time.monotonic() - t0
        policy = Policy.from_checkpoint(Path(vcfg.output_dir) / POLICY_DIR, seed=cfg.seed)
        if not episodes:     # every variant shares the cameras and horizon of the base model
            episodes = heldout_episodes(
                datasets, policy.cfg.cameras, policy.cfg.action.horizon, cfg.frame_stride,
                grounding=any(VARIANTS[v].model_overrides.get('loss.grounding_weight', 0) > 0
                              for v in cfg.variants))
        errors = offline_errors(policy, episodes, cfg.seed)
        row = {'label': VARIANTS[name].label, 'steps': summary.get('steps', cfg.steps),
               'train_s': round(train_s, 1), 'final_loss': summary.get('loss'),
               'parameters': policy.num_parameters(), 'episodes_scored': len(errors['arm'])}
        for key, values in errors.items():
            row[f'{key}_error'] = float(np.mean(values))
            row[f'{key}_error_ci95'] = list(bootstrap_ci(values, cfg.bootstrap_resamples,
                                                         cfg.seed))
        if cfg.episodes > 0:
            row['closed_loop'] = closed_loop(policy, cfg.tasks, cfg.episodes, cfg.image_size)
        rows[name] = row
        log(f'[ablation] {name}: arm error {row["arm_error"]:.4f} rad '
            f'(95% CI {row["arm_error_ci95"][0]:.4f}-{row["arm_error_ci95"][1]:.4f})')
    hold = hold_errors(episodes)
    doc = {'meta': {'datasets': list(cfg.base.data.datasets),
                    'hold_arm_error': float(np.mean(hold)),
                    'hold_arm_error_ci95': list(bootstrap_ci(hold, cfg.bootstrap_resamples,
                                                             cfg.seed)),
                    'heldout': list(cfg.heldout), 'steps': cfg.steps,
                    'batch_size': cfg.base.trainer.batch_size, 'seed': cfg.base.trainer.seed,
                    'frame_stride': cfg.frame_stride, 'closed_loop_episodes': cfg.episodes},
           'variants': rows}
    (cfg.out / 'ablation.json').write_text(json.dumps(doc, indent=2))
    (cfg.out / 'ablation.md').write_text(markdown_table(doc))
    return doc


def markdown_table(doc: dict[str, Any]) -> str:
    variants = doc['variants']
    tasks = sorted({t for row in variants.values() for t in row.get('closed_loop', {})})
    grounded = any('object_error' in row for row in variants.values())
    head = ['variant', 'targets', 'arm error (mrad, 95% CI)', 'gripper error (mm, 95% CI)',
            'final loss', 'train (min)'] + [f'{t} success (95% CI)' for t in tasks]
    if grounded:
        head.insert(4, 'object / goal position error (cm, 95% CI)')
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, row in variants.items():
        a, g = row['arm_error_ci95'], row['gripper_error_ci95']
        cells = [name, row['label'],
                 f'{row["arm_error"] * 1e3:.1f} ({a[0] * 1e3:.1f}-{a[1] * 1e3:.1f})',
                 f'{row["gripper_error"] * 1e3:.2f} ({g[0] * 1e3:.2f}-{g[1] * 1e3:.2f})',
                 '-' if row['final_loss'] is None else f'{row["final_loss"]:.3f}',
                 f'{row["train_s"] / 60:.1f}']
        for t in tasks:
            c = row['closed_loop'][t]
            lo, hi = c['success_ci95']
            cells.append(f'{c["successes"]}/{c["episodes"]} ({lo:.0%}-{hi:.0%})')
        if grounded:
            cells.insert(4, ' / '.join(
                f'{row[k + "_error"] * 1e2:.1f} ({row[k + "_error_ci95"][0] * 1e2:.1f}-'
                f'{row[k + "_error_ci95"][1] * 1e2:.1f})' for k in ('object', 'goal'))
                if 'object_error' in row else '-')
        lines.append('| ' + ' | '.join(cells) + ' |')
    m = doc['meta']
    h = m['hold_arm_error_ci95']
    lines.append('| hold (baseline) | keep the current joints for the whole chunk | '
                 f'{m["hold_arm_error"] * 1e3:.1f} ({h[0] * 1e3:.1f}-{h[1] * 1e3:.1f}) | - | - | '
                 '- |' + ' - |' * (len(tasks) + grounded))
    lines += ['', f'{m["steps"]} steps each at batch {m["batch_size"]} (seed {m["seed"]}) on '
              f'{", ".join(m["datasets"])}; offline error on every {m["frame_stride"]}th frame '
              f'of {", ".join(m["heldout"])} (mean over each sampled chunk, per-episode means, '
              'bootstrap CI over episodes).', '']
    return '\n'.join(lines)
