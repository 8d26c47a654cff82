"""The training loop every torch stage shares: accelerate (DDP/FSDP), schedule, EMA, checkpoints.

It is written against a small protocol, not the VLA: a module whose ``forward(batch)`` returns a
dict of named scalar losses including ``'loss'`` (the one that is optimised). Data positions are
a pure function of (seed, step), so a run resumed from a checkpoint sees the same batches, the
same RNG states and therefore the same losses as an uninterrupted one.
"""
from __future__ import annotations

import csv
import inspect
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from iflybot_vla_policy.training.config import TrainerConfig

CHECKPOINT_PREFIX = 'step_'
STATE_FILE = 'trainer_state.json'   # written last: its presence marks a complete checkpoint
# metrics.csv columns that are not losses (left out of loss.png)
NOT_LOSSES = frozenset({'step', 'lr', 'grad_norm', 'time_s', 'usage', 'perplexity', 'restarts',
                        'peak_mem_gib'})


class LossModel(Protocol):
    """What the trainer optimises: named scalar losses from a batch, 'loss' among them."""

    def __call__(self, batch: Any, **kwargs: Any) -> Mapping[str, torch.Tensor]: ...


# ----------------------------------------------------------------------------------- data order

class BatchPlan:
    """Global batch indices per step: epoch-wise permutations of the dataset, seeded by epoch.

    The global batch of step s is items [s*B, (s+1)*B) of the endless concatenation of
    permutations, so any step's batch is known without replaying the ones before it.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        if num_items <= 0:
            raise ValueError('cannot train on an empty dataset (0 items)')
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache[epoch] = rng.permutation(self.num_items)
        return self._perm_cache[epoch]

    def items(self, start: int, count: int) -> list[int]:
        """Items [start, start + count) of the endless stream of epoch permutations."""
        out: list[int] = []
        while len(out) < count:
            epoch, pos = divmod(start + len(out), self.num_items)
            take = min(count - len(out), self.num_items - pos)
            out.extend(int(i) for i in self._perm(epoch)[pos:pos + take])
        return out

    def global_indices(self, step: int) -> list[int]:
        return self.items(step * self.batch_size, self.batch_size)


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of a global batch (sizes must divide evenly)."""
    if len(indices) % world:
        raise ValueError(f'trainer.batch_size ({len(indices)}) must be divisible by the number '
                         f'of processes ({world})')
    per = len(indices) // world
    return list(indices[rank * per:(rank + 1) * per])


class _RankBatches(Sampler[list[int]]):
    def __init__(self, plan: Any, start: int, stop: int, rank: int, world: int) -> None:
        self.plan, self.start, self.stop, self.rank, self.world = plan, start, stop, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield shard(self.plan.global_indices(step), self.rank, self.world)

    def __len__(self) -> int:
        return self.stop - self.start


# ------------------------------------------------------------------------------ schedule, EMA

def cosine_with_warmup(warmup_steps: int, total_steps: int, min_ratio: float
                       ) -> Callable[[int], float]:
    """LR multiplier: linear 0->1 over warm-up, then cosine 1->min_ratio at total_steps."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


class EMA:
    """Exponential moving average of the trainable parameters (kept in float32).

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates: with a fixed 0.995 the
    average after 200 steps still holds 0.995^200 = 37% of the random initialisation, which
    ruins every early checkpoint and any short run (an ablation of a few hundred steps).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().float().clone()
                       for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        params = dict(model.named_parameters())
        keys = list(self.shadow)
        shadows = [self.shadow[k] for k in keys]
        torch._foreach_mul_(shadows, decay)
        torch._foreach_add_(shadows, [params[k].detach().float() for k in keys],
                            alpha=1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        """Full tensors: under FSDP each process holds the shards of its parameters, which
        this gathers (collective: accelerate's save_state calls it on every process and the
        main one writes it), so a checkpoint resumes on any number of processes."""
        shadow = {k: v.full_tensor() if hasattr(v, 'full_tensor') else v
                  for k, v in self.shadow.items()}
        return {'decay': self.decay, 'updates': self.updates, 'shadow': shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = set(self.shadow) ^ set(state['shadow'])
        if missing:
            raise ValueError(f'EMA state does not match the model: {sorted(missing)[:5]}')
        shadow = {}
        for k, v in state['shadow'].items():
            mine = self.shadow[k]
            v = v.float()
            if hasattr(mine, 'device_mesh'):   # FSDP2 shard (DTensor): keep this process's part
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(mine.device), mine.device_mesh, mine.placements,
                                      src_data_rank=None)   # every process read the same file
            shadow[k] = v.clone()
        self.shadow = shadow
        # Checkpoints from before the warm-up existed were averaged at the full decay.
        self.updates = int(state.get('updates', 10**9))

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for k, v in self.shadow.items():
            params[k].copy_(v.to(params[k].dtype))


@dataclass
class _Progress:
    """The loop position, checkpointed with the rest of the state."""

    step: int = 0
    elapsed_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {'step': self.step, 'elapsed_s': self.elapsed_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state['step'])
        self.elapsed_s = float(state['elapsed_s'])


# ----------------------------------------------------------------------------------- metrics

class MetricsLog:
    """Per-step metrics as CSV (metrics.csv) and a loss-curve PNG (loss.png) in `out_dir`."""

    def __init__(self, out_dir: Path) -> None:
        self.csv_path = out_dir / 'metrics.csv'
        self.png_path = out_dir / 'loss.png'
        self.rows: list[dict[str, float]] = []
        self._fields: list[str] | None = None

    def resume(self, step: int) -> None:
        """Keep rows up to `step` (later ones were logged after the checkpoint resumed from)."""
        if not self.csv_path.is_file():
            return
        with self.csv_path.open() as f:
            rows = [{k: float(v) for k, v in r.items() if v != ''} for r in csv.DictReader(f)]
        self.rows = [r for r in rows if r['step'] <= step]
        self._rewrite()

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        if self._fields is None or any(k not in self._fields for k in row):
            self._rewrite()
            return
        with self.csv_path.open('a', newline='') as f:
            csv.DictWriter(f, fieldnames=self._fields).writerow(row)

    def _rewrite(self) -> None:
        fields: list[str] = []
        for r in self.rows:
            fields.extend(k for k in r if k not in fields)
        self._fields = fields or None
        tmp = self.csv_path.with_suffix('.csv.tmp')
        with tmp.open('w', newline='') as f:
            if fields:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)
        tmp.replace(self.csv_path)

    def plot(self) -> None:
        if not self.rows:
            return
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt

        # losses that are 0 throughout (a kind this run does not train) would hide the log scale
        names = [k for k in self.rows[-1] if k not in NOT_LOSSES
                 and any(r.get(k, 0.0) != 0.0 for r in self.rows)]
        steps = np.array([r['step'] for r in self.rows])
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in names:
            values = np.array([r.get(name, np.nan) for r in self.rows], dtype=float)
            window = max(1, len(values) // 50)
            smooth = np.convolve(np.nan_to_num(values), np.ones(window) / window, mode='valid')
            line, = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            ax.plot(steps[window - 1:], smooth, color=line.get_color(), label=name)
        if all(r.get(n, 1.0) > 0 for r in self.rows for n in names):
            ax.set_yscale('log')
        ax.set_xlabel('step')
        ax.set_ylabel('loss')
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png_path.with_name('loss.tmp.png')
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(self.png_path)


# ------------------------------------------------------------------------------------ trainer

@dataclass
class TrainResult:
    steps: int                      # final step count
    resumed_from: int               # step of the checkpoint resumed from (0 = fresh start)
    history: list[dict[str, float]] = field(default_factory=list)  # all logged rows


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _accepts_kwarg(module: torch.nn.Module, name: str) -> bool:
    params = inspect.signature(module.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in `out_dir/checkpoints`, oldest first."""
    root = Path(out_dir) / 'checkpoints'
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


class Trainer:
    """Optimise `model` on `dataset` with the mechanics of `cfg`; outputs go to `out_dir`.

    `plan` decides which dataset items form each global batch (default: shuffled epochs);
    `on_checkpoint(step, trainer)` runs on every process after each checkpoint (e.g. to export a
    Policy directory with the EMA weights; gathering weights is collective under FSDP, writing
    files is for `trainer.is_main`).
    """

    def __init__(self, model: torch.nn.Module, dataset: Dataset, cfg: TrainerConfig,
                 out_dir: str | Path, collate_fn: Callable[[list[Any]], Any] | None = None,
                 plan: Any | None = None,
                 on_checkpoint: Callable[[int, Trainer], None] | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.on_checkpoint = on_checkpoint
        cpu = cfg.cpu or not torch.cuda.is_available()
        handlers = [DistributedDataParallelKwargs(
            find_unused_parameters=cfg.find_unused_parameters)]
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision,
                                       kwargs_handlers=handlers)
        acc = self.accelerator
        self.plan = plan if plan is not None else BatchPlan(len(dataset), cfg.batch_size,
                                                            cfg.seed)
        shard(range(cfg.batch_size), 0, acc.num_processes)   # fail early on a bad batch size

        self._forward_kwargs: dict[str, Any] = {}
        if _accepts_kwarg(model, 'knowledge_insulation'):
            self._forward_kwargs['knowledge_insulation'] = cfg.knowledge_insulation
        elif cfg.knowledge_insulation:
            raise ValueError('trainer.knowledge_insulation is set but '
                             f'{type(model).__name__}.forward has no knowledge_insulation '
                             'argument')

        if cfg.activation_checkpointing:
            if not hasattr(model, 'set_activation_checkpointing'):
                raise ValueError('trainer.activation_checkpointing is set but '
                                 f'{type(model).__name__} has no set_activation_checkpointing')
            model.set_activation_checkpointing(True)
        fsdp = acc.distributed_type == DistributedType.FSDP
        if fsdp and acc.state.fsdp_plugin.activation_checkpointing:
            # accelerate would wrap each layer in torch's CheckpointWrapper, which renames the
            # parameters (`_checkpoint_wrapped_module.`): EMA and export key on the names
            raise ValueError('the accelerate config sets fsdp_activation_checkpointing: set it to '
                             'false and trainer.activation_checkpointing to true instead (the '
                             "model's own checkpointing keeps the parameter names)")

        o = cfg.optim
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or 'norm' in name.lower() else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{'params': decay, 'weight_decay': o.weight_decay},
             {'params': no_decay, 'weight_decay': 0.0}],
            lr=o.lr, betas=o.betas, eps=o.eps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if hasattr(self.model, 'set_reduce_scatter_unused_params'):
            # FSDP2's find_unused_parameters: a parameter that got no gradient on one process
            # (a batch shard without VQA or grounding samples) still joins the reduce-scatter
            self.model.set_reduce_scatter_unused_params(cfg.find_unused_parameters)
        # Not prepared: accelerate would step a prepared scheduler once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(o.warmup_steps, cfg.steps, o.min_lr_ratio))
        self.ema = EMA(acc.unwrap_model(self.model), cfg.ema_decay) if cfg.ema_decay else None
        self.progress = _Progress()
        acc.register_for_checkpointing(self.scheduler, self.progress)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        self.metrics = MetricsLog(self.out_dir)

    # -- state

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def export_state_dict(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """Full model weights on CPU, with the EMA weights swapped in when EMA is on (call on
        every process: under FSDP gathering the weights is collective)."""
        state = {k: v.detach().cpu().clone()
                 for k, v in self.accelerator.get_state_dict(self.model).items()}
        if use_ema and self.ema is not None:
            for k, v in self.ema.shadow.items():
                if hasattr(v, 'full_tensor'):     # FSDP2 shard (DTensor): gather, collective
                    v = v.full_tensor()
                if k in state:
                    state[k] = v.to(state[k].dtype).cpu().clone()
        return state

    def _resume(self) -> int:
        checkpoints = list_checkpoints(self.out_dir)
        if not checkpoints:
            return 0
        if not self.cfg.resume:
            # a fresh start must not leave older, higher-numbered checkpoints to resume from
            self.accelerator.wait_for_everyone()
            if self.is_main:
                root = self.out_dir / 'checkpoints'
                old = self.out_dir / 'checkpoints.replaced'
                if old.exists():
                    shutil.rmtree(old)
                root.rename(old)
            self.accelerator.wait_for_everyone()
            return 0
        self.accelerator.load_state(str(checkpoints[-1]))
        self._apply_optim_config()
        return self.progress.step

    def _apply_optim_config(self) -> None:
        """A resumed optimiser keeps the checkpoint's lr, betas and weight decay: put the
        config's back, so that a run resumed with a new lr or a longer schedule follows them
        (a warm restart) instead of silently ignoring the edit."""
        o = self.cfg.optim
        groups = self.optimizer.param_groups
        before = groups[0].get('initial_lr', groups[0]['lr'])
        decays = (o.weight_decay, 0.0)
        for group, decay in zip(groups, decays, strict=True):
            group.update(initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=decay)
        self.scheduler.base_lrs = [o.lr] * len(groups)
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in groups:
            group['lr'] = o.lr * factor
        self.scheduler._last_lr = [group['lr'] for group in groups]
        if self.is_main and not math.isclose(before, o.lr):
            print(f'resume: peak lr {before:g} in the checkpoint, {o.lr:g} in the config: '
                  f'following the config (lr now {o.lr * factor:.3g})', flush=True)

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        root = self.out_dir / 'checkpoints'
        final = root / f'{CHECKPOINT_PREFIX}{self.progress.step:07d}'
        tmp = root / f'.tmp_{final.name}'
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(
                {'step': self.progress.step, 'world_size': acc.num_processes}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in list_checkpoints(self.out_dir)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    # -- loop

    def fit(self) -> TrainResult:
        """Train to cfg.steps (resuming when a checkpoint exists); returns the logged history."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        start = self._resume()
        if start == 0:
            torch.manual_seed(cfg.seed + 1000 * acc.process_index)
            np.random.seed(cfg.seed + 1000 * acc.process_index)
        if self.is_main:
            self.metrics.resume(start)
        if start >= cfg.steps:
            return TrainResult(start, start, list(self.metrics.rows))

        stop = cfg.steps if not cfg.max_steps_per_run else min(cfg.steps,
                                                                 start + cfg.max_steps_per_run)
        loader = DataLoader(
            self.dataset, batch_sampler=_RankBatches(self.plan, start, stop,
                                                     acc.process_index, acc.num_processes),
            collate_fn=self.collate_fn, num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed),   # keeps the global RNG intact
            persistent_workers=False)
        bar = tqdm(total=cfg.steps, initial=start, disable=not (self.is_main and cfg.progress),
                   dynamic_ncols=True, desc='train')
        self.model.train()
        t0 = time.monotonic() - self.progress.elapsed_s
        names: list[str] | None = None
        for batch in loader:
            batch = _to_device(batch, acc.device)
            with acc.autocast():
                losses = self.model(batch, **self._forward_kwargs)
            if 'loss' not in losses:
                raise ValueError(f"model returned losses {sorted(losses)} without 'loss'")
            acc.backward(losses['loss'])
            grad_norm = torch.tensor(float('nan'))
            if cfg.optim.grad_clip > 0:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(self.model))
            self.progress.step += 1
            self.progress.elapsed_s = time.monotonic() - t0

            names = names or sorted(losses)
            if sorted(losses) != names:
                raise ValueError(f'loss names changed between steps: {names} -> '
                                 f'{sorted(losses)}')
            values = torch.stack([torch.as_tensor(losses[n]).detach().float().reshape(())
                                  .to(acc.device) for n in names])
            values = acc.reduce(values, reduction='mean').cpu()
            if self.is_main:
                row = {'step': float(self.progress.step), 'lr': lr,
                       'grad_norm': float(grad_norm), 'time_s': self.progress.elapsed_s}
                if acc.device.type == 'cuda':   # peak allocated by tensors so far, this process
                    row['peak_mem_gib'] = torch.cuda.max_memory_allocated(acc.device) / 2**30
                row.update({n: float(v) for n, v in zip(names, values, strict=True)})
                self.metrics.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f'{lr:.2e}', refresh=False)
            bar.update(1)
            step = self.progress.step
            if step % cfg.checkpoint_every == 0 or (step == stop and cfg.checkpoint_at_end):
                self.save_checkpoint()
                if self.is_main:
                    self.metrics.plot()
                if self.on_checkpoint is not None:
                    self.on_checkpoint(step, self)
                acc.wait_for_everyone()
            elif self.is_main and cfg.plot_every and step % cfg.plot_every == 0:
                self.metrics.plot()
        bar.close()
        return TrainResult(self.progress.step, start, list(self.metrics.rows))
