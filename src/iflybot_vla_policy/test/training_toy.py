"""A tiny model and dataset that follow the trainer's protocol, for trainer-mechanics tests.

Also a script: `python -m torch.distributed.run --nproc_per_node 2 training_toy.py OUT STEPS`
trains it on 2 processes (gloo on CPU) and writes the per-step losses to OUT/losses.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset


class ToyRegression(Dataset):
    """y = A x + noise, a fixed set of 64 items (each item a pure function of its index)."""

    def __init__(self, n: int = 64, dim: int = 6) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 3, generator=g) + 0.01 * torch.randn(n, 3, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {'x': self.x[i], 'y': self.y[i]}


class ToyModel(torch.nn.Module):
    """An MLP whose losses follow the protocol; `noisy` adds RNG use (dropout + input noise)."""

    def __init__(self, dim: int = 6, noisy: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.GELU(),
                                       torch.nn.Dropout(0.1 if noisy else 0.0),
                                       torch.nn.Linear(32, 3))
        self.noisy = noisy
        self.insulated_calls = 0

    def forward(self, batch: dict[str, torch.Tensor], knowledge_insulation: bool = False
                ) -> dict[str, torch.Tensor]:
        self.insulated_calls += int(knowledge_insulation)
        x = batch['x']
        if self.noisy:
            x = x + 0.05 * torch.randn_like(x)
        mse = ((self.net(x) - batch['y']) ** 2).mean()
        return {'loss': mse, 'mse': mse.detach()}


def _main(out: str, steps: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from iflybot_vla_policy.training.config import OptimConfig, TrainerConfig
    from iflybot_vla_policy.training.trainer import Trainer

    cfg = TrainerConfig(steps=steps, batch_size=8, checkpoint_every=1000, progress=False,
                        cpu=True, optim=OptimConfig(lr=1e-2, warmup_steps=2))
    trainer = Trainer(ToyModel(), ToyRegression(), cfg, out)
    result = trainer.fit()
    if trainer.is_main:
        info = {'world': trainer.accelerator.num_processes,
                'losses': [r['loss'] for r in result.history]}
        (Path(out) / 'losses.json').write_text(json.dumps(info))


if __name__ == '__main__':
    _main(sys.argv[1], int(sys.argv[2]))


def write_toy_dataset(root: Path, episodes: int = 3, frames: int = 24, size: int = 64,
                      fps: int = 10, seed: int = 0, sim_instructions: bool = False) -> Path:
    """A real LeRobot v3.0 dataset (through the project's writer) of a square sliding across
    both cameras while the 'arm' moves smoothly; actions are the next state. Episode e records
    task pick_place and seed e; `sim_instructions` gives it the instruction the simulator draws
    for that seed (what gen-demos would record), so its scene can be rebuilt."""
    import numpy as np

    from iflybot_vla_policy.data.lerobot_format import EpisodeData
    from iflybot_vla_policy.data.lerobot_writer import WriterConfig, write_dataset
    from iflybot_vla_policy.sim.env import SimEnv

    rng = np.random.default_rng(seed)
    eps = []
    for e in range(episodes):
        t = np.linspace(0, 1, frames, dtype=np.float32)
        phase = rng.uniform(0, 2 * np.pi, 8).astype(np.float32)
        state = 0.3 * np.sin(2 * np.pi * t[:, None] + phase[None])        # (T, 8)
        state[:, 7] = np.where(t < 0.5, 0.08, 0.02)                      # gripper width
        action = np.concatenate([state[1:], state[-1:]])                 # next state
        images = {}
        for cam in ('scene_camera', 'wrist_camera'):
            img = np.full((frames, size, size, 3), 40, dtype=np.uint8)
            x0 = rng.integers(0, size // 2)
            for k in range(frames):
                x = int(x0 + k * (size // 2) / frames)
                img[k, size // 3:size // 3 + 12, x:x + 12] = (220, 60 + 40 * e, 30)
            images[cam] = img
        instruction = f"move the {('red', 'blue', 'green')[e % 3]} block"
        if sim_instructions:
            with SimEnv('pick_place', seed=e, render=False) as env:
                env.reset(seed=e)
                instruction = env.instruction
        eps.append(EpisodeData(state=state.astype(np.float32), action=action.astype(np.float32),
                               images=images, instruction=instruction,
                               task_name='pick_place', episode_id=f'toy{e}', seed=e))
    return write_dataset(root, eps, WriterConfig(fps=fps))
