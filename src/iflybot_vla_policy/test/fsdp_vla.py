"""The VLA trainer run that test_fsdp_training.py compares across process counts (not a test
file): a small Qwen2.5-VL-shaped VLA (the paper preset's code path), 8 fixed robot samples,
global batch 4, EMA on, a Policy exported at every checkpoint.

Also a script, run by `accelerate launch --config_file <FSDP config> fsdp_vla.py OUT STEPS
PER_RUN CKPT`: trains to STEPS (at most PER_RUN steps this invocation, resuming from OUT's
newest checkpoint), with activation checkpointing when CKPT is 1, and writes this run's losses
to OUT/losses_<first step>.json.

accelerate 1.15 enables FSDP only for GPU-like process groups: `AcceleratorState` sets
`DistributedType.FSDP` in a branch that lists MULTI_GPU, MULTI_NPU, MULTI_XPU, ... but not
MULTI_CPU, so `use_cpu` with an FSDP config silently trains with DDP. On CPU this script
therefore switches the state to FSDP once the gloo process group is up (what AcceleratorState
does on GPUs, `fsdp_plugin` built from the same FSDP_* variables accelerate launch exported);
everything after that (fully_shard of the wrapped layer classes, sharded save_state/load_state,
the gathered state dict of the export) is accelerate's and torch's own FSDP2 code.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _vla_fixtures import Rows, family_config, robot_batch, wake  # noqa: E402
from iflybot_vla_policy.model.vla import VLA  # noqa: E402
from iflybot_vla_policy.training.config import OptimConfig, TrainerConfig  # noqa: E402

ITEMS, BATCH = 8, 4


def model_config():
    # insulation off: the expert's loss reaches the backbone through every layer's keys/values
    return family_config('qwen2_5_vl', **{'loss.knowledge_insulation': False})


def trainer_config(steps: int, per_run: int = 0, checkpointing: bool = False) -> TrainerConfig:
    return TrainerConfig(steps=steps, batch_size=BATCH, checkpoint_every=2, keep_checkpoints=1,
                         ema_decay=0.9, progress=False, cpu=True, max_steps_per_run=per_run,
                         activation_checkpointing=checkpointing,
                         optim=OptimConfig(lr=2e-3, warmup_steps=0, grad_clip=1.0))


def model_and_data() -> tuple[VLA, Rows]:
    """The same weights and samples in every process. Every sample has as many FAST tokens,
    latent codes and actions as the others (the data-parallel mean of per-process mean losses is
    then the mean over the global batch), and its own fixed flow noise and time."""
    torch.manual_seed(0)
    model = wake(VLA(model_config()))
    batch = robot_batch(model, batch=ITEMS, seed=1)
    gen = torch.Generator().manual_seed(2)
    batch['fast_tokens'] = torch.randint(0, model.cfg.tokens.fast_vocab, (ITEMS, 6),
                                         generator=gen)
    batch['noise'] = torch.randn(batch['actions'].shape, generator=gen)
    batch['time'] = torch.rand(ITEMS, generator=gen) * 0.9 + 0.05
    return model, Rows(batch)


def train(out: Path, cfg: TrainerConfig):
    """Train (or resume) in `out`, exporting out/policy at every checkpoint."""
    from iflybot_vla_policy.training.trainer import Trainer
    from iflybot_vla_policy.training.vla_stage import VLAObjective, export_policy
    from iflybot_vla_policy.transforms import NormStatsSet

    model, data = model_and_data()
    mcfg, tokenizer = model.cfg, model.tokenizer

    def on_checkpoint(step: int, trainer: Trainer) -> None:
        export_policy(trainer, mcfg, tokenizer, NormStatsSet.identity(mcfg), None, None,
                      out / 'policy')

    trainer = Trainer(VLAObjective(model), data, cfg, out, collate_fn=data.collate,
                      on_checkpoint=on_checkpoint)
    return trainer, trainer.fit()


def _fsdp_on_cpu() -> None:
    """Switch accelerate's process-wide state to FSDP after the gloo group is up (see the
    module docstring); a no-op when accelerate chose FSDP itself (GPUs)."""
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class CpuFsdpAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if self.distributed_type == DistributedType.MULTI_CPU:
                plugin = FullyShardedDataParallelPlugin()   # from the FSDP_* variables
                if self.state.mixed_precision != 'no':
                    plugin.set_mixed_precision(self.state.mixed_precision)
                self.state.fsdp_plugin = plugin
                self.state.distributed_type = DistributedType.FSDP
                PartialState._shared_state['distributed_type'] = DistributedType.FSDP

    accelerate.Accelerator = CpuFsdpAccelerator


def _main(out: str, steps: int, per_run: int, checkpointing: bool) -> None:
    import os

    if os.environ.get('ACCELERATE_USE_FSDP', '').lower() == 'true':
        _fsdp_on_cpu()
    trainer, result = train(Path(out), trainer_config(steps, per_run, checkpointing))
    if trainer.is_main:
        acc = trainer.accelerator
        info = {'world': acc.num_processes, 'fsdp2': bool(acc.is_fsdp2),
                'resumed_from': result.resumed_from,
                'sharded_params': type(next(trainer.model.parameters())).__name__,
                'losses': [r['loss'] for r in result.history[result.resumed_from:]]}
        (Path(out) / f'losses_{result.resumed_from}.json').write_text(json.dumps(info))


if __name__ == '__main__':
    _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == '1')
