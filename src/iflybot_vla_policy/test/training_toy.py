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
