"""Training samples of the VLA stage: robot frames with all their targets, plus spatial VQA.

Everything expensive is computed once before training and kept in RAM (and cached on disk under
`output_dir/cache`, so a resumed run starts quickly): camera frames through the same
resize/letterbox as `Policy`, latent-action codes of each frame from the trained LAM, FAST tokens
of each normalised chunk, tokenised instructions, and a pool of rendered VQA scenes.
A batch plan then mixes ~7% VQA into every global batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset
from iflybot_vla_policy.training.frames import decode_camera, square_resize
from iflybot_vla_policy.training.grounding import EpisodeGrounding, normalise_points
from iflybot_vla_policy.training.lam_stage import pair_indices
from iflybot_vla_policy.training.robot_data import RobotFrames, normalised_chunks, used_frames
from iflybot_vla_policy.training.trainer import BatchPlan
from iflybot_vla_policy.transforms import Transforms, resize_pad

IGNORE = -100


def _key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dataset_id(ds: LeRobotDataset) -> list[Any]:
    info = ds.root / 'meta' / 'info.json'
    return [str(ds.root.resolve()), ds.num_frames, info.stat().st_mtime_ns]


RAM_RESERVE_BYTES = 4 << 30   # left free for the model, its batches and the OS


def _fits_in_ram(nbytes: int) -> bool:
    """Whether `nbytes` more of memory still leaves RAM_RESERVE_BYTES available (Linux)."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return nbytes + RAM_RESERVE_BYTES < int(line.split()[1]) * 1024
    except OSError:
        pass
    return True


def _cached(path: Path | None, make: Any, mmap: bool = False) -> np.ndarray:
    """`make()`, saved to and later loaded from `path`. With `mmap`, an array that does not fit
    in RAM is read from the file on demand, so datasets larger than memory still train; one that
    fits is held in RAM, since file pages can be paged out and re-read from disk (seen on a VM
    with proactive reclaim: 28 GB re-read in 40 minutes of training on a 14 GB cache)."""
    if path is not None and path.is_file():
        if not mmap:
            return np.load(path)
        mapped = np.load(path, mmap_mode='r')
        return np.load(path) if _fits_in_ram(mapped.nbytes) else mapped
    value = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f'{path.stem}.{os.getpid()}.tmp.npy')
        np.save(tmp, value)
        tmp.replace(path)
        if mmap and not _fits_in_ram(0):
            del value
            return np.load(path, mmap_mode='r')
    return value


def model_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (3, size, size): Policy's letterbox resize, stored as bytes."""
    return (resize_pad(image, size) * 255.0).round().to(torch.uint8).numpy()


def model_images(ds: LeRobotDataset, cameras: tuple[str, ...], size: int,
                 cache: Path | None, progress: bool = False) -> np.ndarray:
    """All frames of `cameras` as the model sees them -> (N, n_cam, 3, S, S) uint8."""
    for cam in cameras:
        if cam not in ds.cameras:
            raise ValueError(f"{ds.root}: camera '{cam}' (model config 'cameras') is not in the "
                             f'dataset (cameras: {ds.cameras})')

    def make() -> np.ndarray:
        per_cam = [decode_camera(ds, cam, lambda im: model_image(im, size).transpose(1, 2, 0),
                                 progress=progress) for cam in cameras]       # (N, S, S, 3) each
        return np.stack(per_cam, axis=1).transpose(0, 1, 4, 2, 3).copy()

    path = None if cache is None else cache / f'images_{_key(_dataset_id(ds), cameras, size)}.npy'
    return _cached(path, make, mmap=True)


def latent_codes(ds: LeRobotDataset, lam: Any, camera: str, gap_s: float, cache: Path | None,
                 lam_id: str, progress: bool = False) -> np.ndarray:
    """LAM codes of every frame's pair (t, t + gap) -> (N, n_tokens) int64."""
    def make() -> np.ndarray:
        frames = decode_camera(ds, camera, square_resize(lam.config.image_size),
                               progress=progress)
        pairs = pair_indices(ds, max(1, round(gap_s * ds.fps)))
        codes = np.zeros((ds.num_frames, lam.config.n_tokens), dtype=np.int64)
        lam.eval()
        for k in range(0, len(pairs), 256):
            p = pairs[k:k + 256]
            codes[p[:, 0]] = lam.encode(torch.from_numpy(frames[p[:, 0]]),
                                        torch.from_numpy(frames[p[:, 1]])).numpy()
        return codes

    path = None if cache is None else cache / (
        f'latent_{_key(_dataset_id(ds), camera, gap_s, lam_id)}.npy')
    return _cached(path, make)


def fast_tokens(chunks: np.ndarray, fast: Any, max_len: int) -> tuple[np.ndarray, int]:
    """FAST ids of normalised chunks (n, H, A) -> ((n, L) int64 padded with -100, truncated)."""
    lists = [fast.encode(c)[:max_len + 1] for c in chunks]
    length = min(max_len, max((len(t) for t in lists), default=1))
    out = np.full((len(lists), max(length, 1)), IGNORE, dtype=np.int64)
    truncated = 0
    for i, t in enumerate(lists):
        truncated += len(t) > max_len
        t = t[:max_len]
        out[i, :len(t)] = t
    return out, truncated


@dataclass
class RobotSamples:
    """Model-ready arrays of the robot frames (n frames over all datasets)."""

    images: list[np.ndarray]       # per dataset (N_d, n_cam, 3, S, S) uint8 (all its frames)
    source: np.ndarray             # (n, 2) int64: dataset, frame within it
    state: np.ndarray              # (n, state_dim) float32, normalised, padded
    actions: np.ndarray            # (n, H, action_dim) float32, normalised, padded
    action_mask: np.ndarray        # (n, H) bool
    latent: np.ndarray             # (n, n_latent) int64 (n_latent may be 0)
    fast: np.ndarray               # (n, L) int64, -100 padded (L may be 0)
    text: np.ndarray               # (n,) int64 row of text_ids
    text_ids: np.ndarray           # (K, T) int64 tokenised distinct instructions
    text_mask: np.ndarray          # (K, T) int64
    task: np.ndarray | None = None            # (n,) int64 row of task_names of each frame
    task_names: tuple[str, ...] = ()          # the episodes' task_name ('' if unnamed)
    grounding: np.ndarray | None = None       # (n, 2, 3) float32 normalised targets
    grounding_mask: np.ndarray | None = None  # (n,) bool: the frame's episode has a target

    def __len__(self) -> int:
        return len(self.source)


def robot_samples(frames: list[RobotFrames], transforms: Transforms, tokenizer: Any,
                  images: list[np.ndarray], latents: list[np.ndarray | None], fast: Any,
                  max_fast_tokens: int, groundings: list[EpisodeGrounding] | None = None
                  ) -> tuple[RobotSamples, dict[str, int]]:
    cfg = transforms.cfg
    source, state, actions, mask, latent, fast_l, text = [], [], [], [], [], [], []
    ground, ground_mask, task = [], [], []
    instructions: dict[str, int] = {}
    task_names: dict[str, int] = {}
    truncated = 0
    for d, rf in enumerate(frames):
        idx = used_frames(rf)
        source.append(np.stack([np.full(len(idx), d), idx], axis=1))
        state.append(transforms.state(rf.state[idx]))
        actions.append(transforms.actions_to_model(rf.chunks[idx], rf.state[idx]))
        mask.append(rf.chunk_mask[idx])
        lat = latents[d]
        latent.append(np.zeros((len(idx), 0), np.int64) if lat is None else lat[idx])
        if fast is not None:
            toks, cut = fast_tokens(normalised_chunks(rf, transforms, idx), fast,
                                    max_fast_tokens)
            fast_l.append(toks)
            truncated += cut
        text.append(np.array([instructions.setdefault(rf.dataset.instruction(int(f)),
                                                      len(instructions)) for f in idx]))
        names = [task_names.setdefault(str(ep.get('task_name', '')), len(task_names))
                 for ep in rf.dataset.episodes]
        task.append(np.asarray(names, np.int64)[rf.episode[idx]])
        if groundings is not None:
            episodes = rf.episode[idx]
            ground.append(normalise_points(groundings[d].points[episodes]))
            ground_mask.append(groundings[d].frame_mask(episodes, idx))
    width = max((f.shape[1] for f in fast_l), default=0)
    fast_arr = np.concatenate([np.pad(f, ((0, 0), (0, width - f.shape[1])),
                                      constant_values=IGNORE) for f in fast_l]) if fast_l \
        else np.zeros((sum(len(s) for s in source), 0), np.int64)
    encoded = [tokenizer.encode(t, cfg.backbone.max_text_tokens) for t in instructions]
    samples = RobotSamples(
        images=images, source=np.concatenate(source), state=np.concatenate(state),
        actions=np.concatenate(actions), action_mask=np.concatenate(mask),
        latent=np.concatenate(latent), fast=fast_arr, text=np.concatenate(text),
        text_ids=np.array([e[0] for e in encoded], np.int64),
        text_mask=np.array([e[1] for e in encoded], np.int64),
        task=np.concatenate(task), task_names=tuple(task_names),
        grounding=np.concatenate(ground) if ground else None,
        grounding_mask=np.concatenate(ground_mask) if ground_mask else None)
    info = {'fast_truncated': truncated, 'instructions': len(instructions),
            'frames_per_task': {name: int((samples.task == k).sum())
                                for name, k in task_names.items()}}
    if ground_mask:
        info['grounded_frames'] = int(samples.grounding_mask.sum())
    return samples, info


@dataclass
class VQASamples:
    images: np.ndarray             # (m, n_cam, 3, S, S) uint8
    state: np.ndarray              # (m, state_dim) float32
    text_ids: np.ndarray           # (m, T) question
    text_mask: np.ndarray          # (m, T)
    answer_ids: np.ndarray         # (m, L) int64, -100 padded (answer + eos)
    questions: list[str]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.questions)


def vqa_samples(scenes: list[Any], transforms: Transforms, tokenizer: Any) -> VQASamples:
    """One sample per question of each rendered scene (sim.VQAScene list)."""
    cfg = transforms.cfg
    eos = tokenizer.tok.token_to_id('<eos>')
    images, state, ids, masks, answers, qs, ans = [], [], [], [], [], [], []
    for scene in scenes:
        img = np.stack([model_image(scene.images[c], cfg.image_size) for c in cfg.cameras])
        st = transforms.state(scene.state)
        for qa in scene.qas:
            q_ids, q_mask = tokenizer.encode(qa.question, cfg.backbone.max_text_tokens)
            a = tokenizer.encode_text(qa.answer) + ([eos] if eos is not None else [])
            images.append(img)
            state.append(st)
            ids.append(q_ids)
            masks.append(q_mask)
            answers.append(a)
            qs.append(qa.question)
            ans.append(qa.answer)
    width = max(len(a) for a in answers)
    answer_ids = np.full((len(answers), width), IGNORE, dtype=np.int64)
    for i, a in enumerate(answers):
        answer_ids[i, :len(a)] = a
    return VQASamples(np.stack(images), np.stack(state), np.array(ids, np.int64),
                      np.array(masks, np.int64), answer_ids, qs, ans)


class VLADataset(Dataset):
    """Items [0, n_robot) are robot frames, [n_robot, n_robot + n_vqa) VQA questions; every item
    has the same keys so one batch can mix both (`is_robot` tells them apart)."""

    def __init__(self, robot: RobotSamples, vqa: VQASamples | None) -> None:
        self.robot, self.vqa = robot, vqa
        self.n_robot = len(robot)
        self.n_vqa = 0 if vqa is None else len(vqa)
        horizon, action_dim = robot.actions.shape[1:]
        self._zero_actions = torch.zeros(horizon, action_dim)
        self._no_fast = torch.full((robot.fast.shape[1],), IGNORE, dtype=torch.long)
        self._no_latent = torch.full((robot.latent.shape[1],), IGNORE, dtype=torch.long)
        width = 1 if vqa is None else vqa.answer_ids.shape[1]
        self._no_answer = torch.full((width,), IGNORE, dtype=torch.long)

    def __len__(self) -> int:
        return self.n_robot + self.n_vqa

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < self.n_robot:
            r = self.robot
            d, f = r.source[i]
            t = int(r.text[i])
            return {'images': torch.from_numpy(np.array(r.images[d][f])),   # copy out of the mmap
                    'text_ids': torch.from_numpy(r.text_ids[t]),
                    'text_mask': torch.from_numpy(r.text_mask[t]),
                    'state': torch.from_numpy(r.state[i]),
                    'actions': torch.from_numpy(r.actions[i]),
                    'action_mask': torch.from_numpy(r.action_mask[i]),
                    'latent_tokens': torch.from_numpy(r.latent[i]),
                    'fast_tokens': torch.from_numpy(r.fast[i]),
                    'answer_ids': self._no_answer,
                    'is_robot': torch.tensor(True),
                    **self._grounding(i)}
        v, k = self.vqa, i - self.n_robot
        assert v is not None
        return {'images': torch.from_numpy(v.images[k]),
                'text_ids': torch.from_numpy(v.text_ids[k]),
                'text_mask': torch.from_numpy(v.text_mask[k]),
                'state': torch.from_numpy(v.state[k]),
                'actions': self._zero_actions,
                'action_mask': torch.zeros(self._zero_actions.shape[0], dtype=torch.bool),
                'latent_tokens': self._no_latent,
                'fast_tokens': self._no_fast,
                'answer_ids': torch.from_numpy(v.answer_ids[k]),
                'is_robot': torch.tensor(False),
                **self._grounding(None)}

    def _grounding(self, i: int | None) -> dict[str, torch.Tensor]:
        """Robot frame i's grounding target, or an empty (masked) one; {} without targets."""
        r = self.robot
        if r.grounding is None or r.grounding_mask is None:
            return {}
        if i is None:
            return {'grounding': torch.zeros(r.grounding.shape[1:]),
                    'grounding_mask': torch.tensor(False)}
        return {'grounding': torch.from_numpy(r.grounding[i]),
                'grounding_mask': torch.tensor(bool(r.grounding_mask[i]))}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack, then drop trailing columns of token targets that are padding in every row."""
    batch = default_collate(items)
    for key in ('fast_tokens', 'answer_ids'):
        used = (batch[key] != IGNORE).any(0).nonzero()
        width = int(used.max()) + 1 if len(used) else 0
        batch[key] = batch[key][:, :width]
    if batch['fast_tokens'].shape[1] == 0:
        del batch['fast_tokens']
    if batch['answer_ids'].shape[1] == 0:
        del batch['answer_ids']
    if batch['latent_tokens'].shape[1] == 0:
        del batch['latent_tokens']
    return batch


class TaskBalancedPlan:
    """The robot items as an endless stream that takes the tasks in turn, each task walking its
    own shuffled epochs: any B consecutive items hold B/T of every task (within one), however
    unequal the tasks' frame counts (drawer demos are half as long as pick-and-place ones).
    Same interface as BatchPlan.items, so a step's batch is known without replaying."""

    def __init__(self, groups: list[np.ndarray], seed: int) -> None:
        self.groups = [np.asarray(g, np.int64) for g in groups if len(g)]
        if not self.groups:
            raise ValueError('cannot train on an empty dataset (0 items)')
        self._plans = [BatchPlan(len(g), 1, seed + 7919 * k) for k, g in enumerate(self.groups)]

    def items(self, start: int, count: int) -> list[int]:
        n = len(self.groups)
        out = []
        for p in range(start, start + count):
            k, turn = p % n, p // n
            out.append(int(self.groups[k][self._plans[k].items(turn, 1)[0]]))
        return out


class MixedPlan:
    """Global batches with a fixed share of VQA: step s holds floor((s+1) r B) - floor(s r B)
    VQA items (so the long-run share is exactly r), spread evenly through the batch so every
    process gets its part; robot and VQA items each walk their own shuffled epochs (with
    `robot_groups`, the robot items take the groups, e.g. tasks, in turn)."""

    def __init__(self, n_robot: int, n_vqa: int, batch_size: int, ratio: float,
                 seed: int, robot_groups: list[np.ndarray] | None = None) -> None:
        self.batch_size = batch_size
        self.ratio = ratio if n_vqa else 0.0
        self.n_robot = n_robot
        self.robot = (TaskBalancedPlan(robot_groups, seed) if robot_groups
                      else BatchPlan(n_robot, batch_size, seed))
        self.vqa = BatchPlan(n_vqa, batch_size, seed + 1) if n_vqa else None

    def _vqa_before(self, step: int) -> int:
        return int(np.floor(step * self.ratio * self.batch_size + 1e-9))

    def vqa_count(self, step: int) -> int:
        return self._vqa_before(step + 1) - self._vqa_before(step)

    def global_indices(self, step: int) -> list[int]:
        b = self.batch_size
        nv = self.vqa_count(step)
        robot = self.robot.items(step * b - self._vqa_before(step), b - nv)
        if nv == 0 or self.vqa is None:
            return robot
        vqa = [self.n_robot + i for i in self.vqa.items(self._vqa_before(step), nv)]
        slots = {int((k + 0.5) * b / nv) for k in range(nv)}
        out, r, v = [], iter(robot), iter(vqa)
        for pos in range(b):
            out.append(next(v) if pos in slots else next(r))
        return out
