"""openpi-style policy: observation dict in, action chunk out; checkpoints as directories.

Checkpoint directory:
  config.yaml         the full VLAConfig
  model.safetensors   weights (tied tensors stored once)
  norm_stats.json     model-space state/action statistics (transforms.NormStatsSet)
  tokenizer.json      the VLM's text tokenizer, with latent and FAST tokens
  fast/               optional FAST tokenizer (model.fast.FastTokenizer.save/load)
  lam/                optional latent action model (model.lam.LatentActionModel.save/load)
Every load error names the file and, where it applies, the key.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iflybot_vla_policy import bundle
from iflybot_vla_policy.config import VLAConfig, config_from_yaml, config_to_yaml, get_config
from iflybot_vla_policy.engine import InferenceEngine
from iflybot_vla_policy.model.text_tokenizer import TextTokenizer
from iflybot_vla_policy.model.vla import VLA
from iflybot_vla_policy.rtc import RTCConfig, RTCGuide
from iflybot_vla_policy.transforms import NormStatsSet, Transforms
from iflybot_vla_policy.types import InferenceResult, Observation

CONFIG_FILE = 'config.yaml'
WEIGHTS_FILE = 'model.safetensors'
NORM_FILE = 'norm_stats.json'
TOKENIZER_FILE = 'tokenizer.json'
FAST_DIR = 'fast'
LAM_DIR = 'lam'

log = logging.getLogger(__name__)


class Policy:
    """Wraps model, transforms and engine. `infer(obs)` is the whole inference contract.

    The engine runs its fast path unless `eager=True` (engine.py: the same chunk up to float
    rounding; eager is the reference). `from_config`/`from_checkpoint` also warm it up and keep
    the seconds that took in `warmup_s` (None until `warm_up` ran).
    """

    def __init__(self, cfg: VLAConfig, model: VLA, norm: NormStatsSet | None = None, *,
                 fast: Any = None, lam: Any = None, seed: int = 0, dtype: str | None = None,
                 compile: bool | str = False, device: str | None = None,
                 noise_scale: float = 1.0, eager: bool = False,
                 rtc: RTCConfig | None = None) -> None:
        if not 0.0 <= noise_scale <= 1.0:
            raise ValueError(f'noise_scale must be in [0, 1], got {noise_scale}')
        self.cfg = cfg
        # std of the flow's starting noise: 1 samples the learned distribution, 0 integrates
        # from its centre (deterministic, less action-to-action jitter), in between tempers it
        self.noise_scale = noise_scale
        self.rtc = rtc or RTCConfig()    # how `infer(previous=...)` guides the overlap
        self.model = model
        self.transforms = Transforms(cfg, norm)
        self.fast = fast
        self.lam = lam
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        if dtype is None:
            dtype = 'float32' if (device or 'cpu') == 'cpu' else cfg.dtype
        self.engine = InferenceEngine(model, dtype=dtype, compile=compile, device=device,
                                      eager=eager)

    # -- construction

    @classmethod
    def from_config(cls, cfg_or_name: VLAConfig | str = 'tiny', seed: int = 0,
                    overrides: Mapping[str, Any] | None = None, warm_up: bool = True,
                    **engine: Any) -> Policy:
        """Random-init model (deterministic given `seed`) with identity normalisation.
        `engine` keywords go to `Policy` (eager, device, dtype, compile, noise_scale)."""
        cfg = cfg_or_name if isinstance(cfg_or_name, VLAConfig) else \
            get_config(cfg_or_name, overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VLA(cfg)
        policy = cls(cfg, model, seed=seed, **engine)
        if warm_up:
            policy.warm_up()
        return policy

    @classmethod
    def from_checkpoint(cls, directory: str | Path, seed: int = 0,
                        noise_scale: float | None = None, warm_up: bool = True,
                        **engine: Any) -> Policy:
        """Load a saved policy; `noise_scale` None takes its bundle.yaml's, else 1. `engine`
        keywords go to `Policy` (eager=True for the reference path, device, dtype, compile)."""
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f'checkpoint directory not found: {d}')
        engine['noise_scale'] = bundle.noise_scale(d, noise_scale)
        cfg_path = d / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f'checkpoint is missing {cfg_path}')
        try:
            cfg = config_from_yaml(cfg_path.read_text())
        except Exception as err:  # yaml errors and our ValueErrors alike
            raise ValueError(f'{cfg_path}: {err}') from None
        tokenizer = TextTokenizer.load(d / TOKENIZER_FILE, cfg.backbone.text_vocab,
                                       cfg.tokens.latent_codebook, cfg.tokens.fast_vocab)
        with torch.random.fork_rng(devices=[]):
            model = VLA(cfg, tokenizer)
        load_weights(model, d / WEIGHTS_FILE)
        norm = NormStatsSet.load(d / NORM_FILE, cfg)
        fast = lam = None
        if (d / FAST_DIR).is_dir():
            from iflybot_vla_policy.model.fast import FastTokenizer
            fast = FastTokenizer.load(d / FAST_DIR)
        if (d / LAM_DIR).is_dir():
            from iflybot_vla_policy.model.lam import LatentActionModel
            lam = LatentActionModel.load(d / LAM_DIR)
        policy = cls(cfg, model, norm, fast=fast, lam=lam, seed=seed, **engine)
        if warm_up:
            policy.warm_up()
        return policy

    def warm_up(self, runs: int = 2) -> float:
        """Run `runs` chunks on a blank observation, so that the first real chunk does not pay
        for building the fast path's derived weights (or a compile); returns the seconds, also
        kept in `warmup_s` and logged. The policy's noise generator is not advanced."""
        ids, mask = self.tokenizer.encode('warm up', self.cfg.backbone.max_text_tokens)
        seconds = self.engine.warm_up(torch.tensor(ids), torch.tensor(mask), runs=runs)
        log.info('policy warm-up: %.3f s (%d chunks, %s path)', seconds, runs,
                 'eager' if self.engine.eager else 'fast')
        return seconds

    @property
    def warmup_s(self) -> float | None:
        return self.engine.warmup_s

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_FILE).write_text(config_to_yaml(self.cfg))
        save_weights(self.model, d / WEIGHTS_FILE)
        self.transforms.norm.save(d / NORM_FILE)
        self.model.tokenizer.save(d / TOKENIZER_FILE)
        if self.fast is not None:
            self.fast.save(d / FAST_DIR)
        if self.lam is not None:
            self.lam.save(d / LAM_DIR)
        return d

    # -- properties

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.model.tokenizer

    @property
    def norm_stats(self) -> NormStatsSet:
        return self.transforms.norm

    @norm_stats.setter
    def norm_stats(self, norm: NormStatsSet) -> None:
        self.transforms = Transforms(self.cfg, norm, self.transforms.gripper_max_width)

    @property
    def dt(self) -> float:
        return self.cfg.action.dt

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- inference

    def _prepare(self, observations: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        tf = self.transforms
        for obs in observations:
            tf.validate(obs)
        text = [self.tokenizer.encode(o['instruction'], self.cfg.backbone.max_text_tokens)
                for o in observations]
        return {
            'images': self._images(observations),
            'text_ids': torch.tensor([t[0] for t in text], dtype=torch.long),
            'text_mask': torch.tensor([t[1] for t in text], dtype=torch.long),
            'state': torch.from_numpy(np.stack([tf.state(o['state']) for o in observations])),
        }

    def _images(self, observations: Sequence[Mapping]) -> torch.Tensor:
        """(B, n_cam, 3, S, S): uint8 as received when every camera already has the model's
        size (the engine scales it; letterboxing would only copy it to float, ~0.3 ms per
        camera), else the transforms' letterboxed float in [0, 1]."""
        size, cams = self.cfg.image_size, self.cfg.cameras
        if all(o['images'][c].shape[:2] == (size, size) for o in observations for c in cams):
            pixels = np.stack([[o['images'][c] for c in cams] for o in observations])
            return torch.from_numpy(pixels).permute(0, 1, 4, 2, 3).contiguous()
        return torch.stack([self.transforms.images(o['images']) for o in observations])

    def infer_batch(self, observations: Sequence[Mapping], seed: int | None = None,
                    recompute_prefix_every_step: bool = False,
                    previous: np.ndarray | None = None,
                    inference_delay: int = 0) -> dict[str, Any]:
        """Batched `infer`: 'actions' (B, horizon, action_dim) float32, 'latent_tokens' (B, n);
        `previous` (B, L, A) robot actions as in `infer`."""
        if not observations:
            raise ValueError('infer_batch needs at least one observation')
        t0 = time.perf_counter()
        inputs = self._prepare(observations)
        states = np.stack([np.asarray(o['state'], dtype=np.float64) for o in observations])
        guide = None if previous is None else self._rtc_guide(previous, states,
                                                               inference_delay)
        t1 = time.perf_counter()
        gen = None if seed is not None else self._generator
        noise = self.engine.noise(len(observations), seed, gen) * self.noise_scale
        out = self.engine.sample(inputs['images'], inputs['text_ids'], inputs['text_mask'],
                                 inputs['state'], noise=noise,
                                 recompute_prefix_every_step=recompute_prefix_every_step,
                                 rtc=guide)
        t2 = time.perf_counter()
        actions = self.transforms.actions_from_model(out.actions.cpu().numpy(), states)
        if guide is not None and inference_delay:   # exact, not through the float32 round trip
            actions[:, :inference_delay] = np.asarray(previous, np.float32)[:, :inference_delay]
        t3 = time.perf_counter()
        timing = {'preprocess': (t1 - t0) * 1e3, **out.timing_ms,
                  'postprocess': (t3 - t2) * 1e3, 'total': (t3 - t0) * 1e3}
        return {'actions': actions, 'dt': float(self.cfg.action.dt),
                'latent_tokens': out.latent_tokens.cpu().numpy().astype(np.int64),
                'timing_ms': timing}

    def _rtc_guide(self, previous: np.ndarray, states: np.ndarray, delay: int) -> RTCGuide:
        """Robot-space previous actions (B, L, A) -> the engine's model-space guide, relative
        to the new observations' states (as the new chunk is)."""
        prev = np.asarray(previous, dtype=np.float64)
        if prev.ndim != 3 or prev.shape[0] != len(states):
            raise ValueError(f'previous actions must be (B={len(states)}, L, '
                             f'{self.cfg.robot_action_dim}), got {prev.shape}')
        model = self.transforms.actions_to_model(prev, states)              # (B, L, action_dim)
        a = self.cfg.action
        return RTCGuide.build(torch.from_numpy(model), delay, a.horizon, a.action_dim,
                              self.rtc, dims=self.cfg.robot_action_dim)

    @property
    def has_grounding(self) -> bool:
        return self.model.grounding_head is not None

    @torch.no_grad()
    def ground(self, observations: Sequence[Mapping]) -> np.ndarray:
        """(B, 2, 3) float64 m, base frame: where the grounding head (`loss.grounding_weight`)
        puts the object the instruction names and its destination. A probe of what the vision
        path localises; inference never needs it."""
        from iflybot_vla_policy.model.vla import as_float_images
        from iflybot_vla_policy.training.grounding import GROUNDING_CENTER, GROUNDING_SCALE

        if not self.has_grounding:
            raise ValueError('this policy has no grounding head (trained with '
                             'loss.grounding_weight = 0)')
        inputs = self._prepare(observations)
        dev, dtype = self.engine.device, self.engine.dtype
        prefix = self.model.backbone.encode_prefix(
            as_float_images(inputs['images']).to(dev, dtype), inputs['text_ids'].to(dev),
            inputs['text_mask'].to(dev))
        points = self.model.grounding(prefix.summary).float().cpu().numpy()   # (B, 2, 3)
        return points.astype(np.float64) * GROUNDING_SCALE + GROUNDING_CENTER

    def infer(self, obs: Observation | Mapping, seed: int | None = None,
              recompute_prefix_every_step: bool = False, previous: np.ndarray | None = None,
              inference_delay: int = 0) -> InferenceResult:
        """obs {'images': {cam: uint8 (H, W, 3)}, 'state': float (8,), 'instruction': str} ->
        {'actions': float32 (horizon, action_dim), 'dt': s, 'latent_tokens': (n,), 'timing_ms'}.

        Noise comes from the policy's generator (seeded at construction), or from `seed`,
        scaled by `noise_scale`.

        Real-time chunking (rtc.py, configured by `self.rtc`): `previous` (L, A) are the
        actions of the chunk being executed that remain from this observation's time on, on
        the new chunk's grid (previous[j] is the old action for the new step j, as the policy
        returned them); the first `inference_delay` of them execute while this chunk is
        computed and come back unchanged, the rest of the overlap guides the new chunk.
        """
        prev = None if previous is None else np.asarray(previous)[None]
        out = self.infer_batch([obs], seed=seed,
                               recompute_prefix_every_step=recompute_prefix_every_step,
                               previous=prev, inference_delay=inference_delay)
        out['actions'] = out['actions'][0]
        out['latent_tokens'] = out['latent_tokens'][0]
        return InferenceResult(**out)


# ---------------------------------------------------------------------------------------------
# weights


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied tensors (same storage) are stored once; returns (tensors, alias -> stored name)."""
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    out, aliases = {}, {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out, aliases


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tensors, aliases = _dedupe(model.state_dict())
    meta = {f'alias:{k}': v for k, v in aliases.items()}
    save_file(tensors, str(path), metadata={'format': 'pt', **meta})


def load_weights(model: torch.nn.Module, path: Path, allow_missing: bool = False) -> list[str]:
    """Strict load; every problem names the file and the key. `allow_missing` (warm starts of a
    model that grew a module) keeps the fresh values of keys the file lacks and returns them."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f'checkpoint is missing {path}')
    expected = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[name] = f.get_tensor(name)
    except Exception as err:  # safetensors raises its own error types for truncation/corruption
        raise ValueError(f'{path}: cannot read weights (truncated or corrupt file?): {err}') \
            from None
    for key, value in meta.items():
        if key.startswith('alias:') and value in tensors:
            tensors[key[len('alias:'):]] = tensors[value]
    missing = [name for name in expected if name not in tensors]
    for name, ref in expected.items():
        if name not in tensors:
            if allow_missing:
                continue
            raise ValueError(f"{path}: missing key '{name}' (checkpoint and config.yaml "
                             'do not match)')
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise ValueError(f"{path}: key '{name}' has shape {tuple(tensors[name].shape)}, "
                             f'the model built from config.yaml expects {tuple(ref.shape)}')
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{path}: unexpected key '{unexpected[0]}' ({len(unexpected)} in all; "
                         'checkpoint and config.yaml do not match)')
    model.load_state_dict(tensors, strict=not allow_missing)
    return missing
