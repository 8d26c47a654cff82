"""Trainer mechanics on a toy model: schedule, curves, resume, DDP over gloo, config errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from iflybot_vla_policy.training.config import (  # noqa: E402
    OptimConfig,
    TrainerConfig,
    load_train_config,
)
from iflybot_vla_policy.training.trainer import (  # noqa: E402
    BatchPlan,
    Trainer,
    cosine_with_warmup,
    list_checkpoints,
)
from training_toy import ToyModel, ToyRegression  # noqa: E402

TOY = Path(__file__).parent / 'training_toy.py'


def _cfg(**kw) -> TrainerConfig:
    base = dict(steps=20, batch_size=8, checkpoint_every=100, progress=False, cpu=True,
                optim=OptimConfig(lr=1e-2, warmup_steps=2))
    base.update(kw)
    return TrainerConfig(**base)


def test_cosine_schedule_warms_up_then_decays_to_floor():
    f = cosine_with_warmup(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_batch_plan_covers_every_item_once_per_epoch():
    plan = BatchPlan(10, 4, seed=3)
    first_epoch = plan.global_indices(0) + plan.global_indices(1) + plan.global_indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert plan.global_indices(7) == BatchPlan(10, 4, seed=3).global_indices(7)


def test_training_lowers_loss_and_writes_csv_and_png(tmp_path):
    cfg = _cfg(steps=40, checkpoint_every=20, optim=OptimConfig(lr=3e-2, warmup_steps=2))
    result = Trainer(ToyModel(), ToyRegression(), cfg, tmp_path).fit()
    losses = [r['loss'] for r in result.history]
    assert len(losses) == 40
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10])
    header = (tmp_path / 'metrics.csv').read_text().splitlines()[0].split(',')
    assert {'step', 'lr', 'grad_norm', 'loss', 'mse'} <= set(header)
    assert (tmp_path / 'loss.png').read_bytes()[:4] == b'\x89PNG'
    assert [p.name for p in list_checkpoints(tmp_path)] == ['step_0000020', 'step_0000040']


def test_grad_clipping_bounds_the_update(tmp_path):
    result = Trainer(ToyModel(), ToyRegression(),
                     _cfg(steps=3, optim=OptimConfig(lr=1e-2, grad_clip=1e-3, warmup_steps=0)),
                     tmp_path).fit()
    assert all(r['grad_norm'] > 1e-3 for r in result.history)   # norm before clipping


class _Stop(Exception):
    pass


def _stop_at(step_to_stop: int):
    def hook(step, trainer):
        if step == step_to_stop:
            raise _Stop
    return hook


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    cfg = _cfg(steps=16, checkpoint_every=6, ema_decay=0.9)
    straight = Trainer(ToyModel(noisy=True), ToyRegression(), cfg, tmp_path / 'a').fit()

    with pytest.raises(_Stop):
        Trainer(ToyModel(noisy=True), ToyRegression(), cfg, tmp_path / 'b',
                on_checkpoint=_stop_at(12)).fit()
    # a fresh model (different init) must be overwritten by the checkpoint
    torch.manual_seed(99)
    resumed_trainer = Trainer(ToyModel(noisy=True), ToyRegression(), cfg, tmp_path / 'b')
    resumed = resumed_trainer.fit()
    assert resumed.resumed_from == 12
    a = [r['loss'] for r in straight.history]
    b = [r['loss'] for r in resumed.history]
    assert len(b) == 16
    assert b == pytest.approx(a, rel=1e-6, abs=1e-7)
    assert resumed_trainer.export_state_dict()['net.0.weight'].shape == (32, 6)


def test_resume_follows_the_configs_new_lr_and_schedule(tmp_path, capsys):
    """A warm restart: resuming with another lr and more steps must use them, not the lr and
    schedule stored in the checkpoint's optimiser (seen: a resumed run ignored optim.lr)."""
    first = _cfg(steps=4, checkpoint_every=4, optim=OptimConfig(lr=1e-2, warmup_steps=2,
                                                               weight_decay=0.0))
    Trainer(ToyModel(), ToyRegression(), first, tmp_path).fit()
    longer = _cfg(steps=10, checkpoint_every=10, optim=OptimConfig(lr=1e-3, warmup_steps=2,
                                                                  weight_decay=0.05))
    trainer = Trainer(ToyModel(), ToyRegression(), longer, tmp_path)
    result = trainer.fit()
    assert result.resumed_from == 4
    factor = cosine_with_warmup(2, 10, longer.optim.min_lr_ratio)
    lrs = [r['lr'] for r in result.history[4:]]
    assert lrs == pytest.approx([1e-3 * factor(s) for s in range(4, 10)])
    assert trainer.optimizer.param_groups[0]['weight_decay'] == 0.05
    assert 'following the config' in capsys.readouterr().out


def test_resume_after_finish_trains_no_further(tmp_path):
    cfg = _cfg(steps=4, checkpoint_every=2)
    Trainer(ToyModel(), ToyRegression(), cfg, tmp_path).fit()
    again = Trainer(ToyModel(), ToyRegression(), cfg, tmp_path).fit()
    assert again.resumed_from == 4 and len(again.history) == 4


def test_knowledge_insulation_flag_reaches_the_model(tmp_path):
    model = ToyModel()
    Trainer(model, ToyRegression(), _cfg(steps=2, knowledge_insulation=True), tmp_path).fit()
    assert model.insulated_calls == 2


def test_knowledge_insulation_on_a_model_without_it_is_an_error(tmp_path):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, batch):
            return {'loss': self.w.sum()}

    with pytest.raises(ValueError, match='knowledge_insulation'):
        Trainer(Plain(), ToyRegression(), _cfg(knowledge_insulation=True), tmp_path)


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    one = Trainer(ToyModel(), ToyRegression(), _cfg(steps=6), tmp_path / 'one').fit()
    env = dict(os.environ, OMP_NUM_THREADS='1', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=str(29500 + os.getpid() % 1000))
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                    '--master_port', env['MASTER_PORT'], str(TOY), str(tmp_path / 'two'), '6'],
                   check=True, env=env, timeout=240, capture_output=True)
    info = json.loads((tmp_path / 'two' / 'losses.json').read_text())
    assert info['world'] == 2
    assert info['losses'] == pytest.approx([r['loss'] for r in one.history], rel=1e-5)


def test_batch_size_not_divisible_by_processes_is_rejected():
    from iflybot_vla_policy.training.trainer import shard
    with pytest.raises(ValueError, match='batch_size'):
        shard(list(range(7)), 0, 2)


def test_config_errors_name_the_bad_key(tmp_path):
    path = tmp_path / 't.yaml'
    path.write_text('stage: vla\noutput_dir: out\ntrainer:\n  stpes: 10\n')
    with pytest.raises(ValueError, match=r"trainer\.stpes.*did you mean 'trainer\.steps'"):
        load_train_config(path)
    path.write_text('stage: vla\noutput_dir: out\ntrainer:\n  optim:\n    lr: fast\n')
    with pytest.raises(ValueError, match=r"trainer\.optim\.lr' must be a number"):
        load_train_config(path)
    path.write_text('stage: dance\noutput_dir: out\n')
    with pytest.raises(ValueError, match="'stage' must be one of"):
        load_train_config(path)
    path.write_text('stage: lam\n')
    with pytest.raises(ValueError, match="missing required key 'output_dir'"):
        load_train_config(path)
    path.write_text('stage: lam\noutput_dir: o\ntrainer: {steps: 0}\n')
    with pytest.raises(ValueError, match='trainer.steps must be > 0'):
        load_train_config(path)


def test_config_reads_yaml_exponents_and_overrides(tmp_path):
    path = tmp_path / 't.yaml'
    path.write_text('stage: vla\noutput_dir: out\ntrainer:\n  optim:\n    lr: 3e-4\n')
    cfg = load_train_config(path, {'trainer.steps': 7, 'data.vqa_ratio': 0.1})
    assert cfg.trainer.optim.lr == pytest.approx(3e-4)
    assert cfg.trainer.steps == 7 and cfg.data.vqa_ratio == pytest.approx(0.1)


def test_shipped_training_and_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    from iflybot_vla_policy.config import get_config

    root = Path(__file__).resolve().parents[3] / 'config' / 'train'
    stages = {}
    for path in sorted(root.glob('*.yaml')):
        if path.name.startswith('accelerate_'):
            assert load_config_from_file(str(path)).num_processes >= 1
            continue
        cfg = load_train_config(path)
        get_config(cfg.model, cfg.model_overrides or None)
        stages[path.stem] = cfg.stage
    assert stages['tiny_lam'] == 'lam' and stages['tiny_fast'] == 'fast'
    assert stages['tiny_vla'] == 'vla' and stages['paper_vla'] == 'vla'
    tiny = load_train_config(root / 'tiny_vla.yaml')
    assert tiny.data.vqa_ratio == pytest.approx(0.07)


def test_ema_weights_are_the_moving_average_of_the_trained_weights(tmp_path):
    model = ToyModel()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, ToyRegression(), _cfg(steps=1, ema_decay=0.25), tmp_path)
    trainer.fit()
    raw = trainer.export_state_dict(use_ema=False)
    ema = trainer.export_state_dict(use_ema=True)
    for k in init:
        assert not torch.allclose(raw[k], init[k])
        # first update: the warmed-up decay min(0.25, 1 / 10)
        torch.testing.assert_close(ema[k], 0.1 * init[k] + 0.9 * raw[k])


def test_ema_of_a_short_run_has_forgotten_the_random_initialisation():
    from iflybot_vla_policy.training.trainer import EMA

    model = torch.nn.Linear(4, 4)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.995)
    torch.nn.init.ones_(model.weight)           # trained weights: 1, initialisation: 0
    for _ in range(200):
        ema.update(model)
    # a fixed 0.995 would still hold 0.995^200 = 37% of the initialisation here
    assert float(ema.shadow['weight'].min()) > 0.99
    assert ema.current_decay() == pytest.approx(201 / 210)   # still warming up
    restored = EMA(model, decay=0.995)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 200
    old = {k: v for k, v in ema.state_dict().items() if k != 'updates'}   # older checkpoints
    restored.load_state_dict(old)
    assert restored.current_decay() == pytest.approx(0.995)


def test_train_command_refuses_a_config_of_another_stage_and_bad_keys(tmp_path, capsys):
    from iflybot_vla_policy.cli import main

    path = tmp_path / 'lam.yaml'
    path.write_text('stage: lam\noutput_dir: out\n')
    assert main(['train', 'vla', '--config', str(path)]) == 2
    assert "'lam' config, not 'vla'" in capsys.readouterr().err
    assert main(['train', 'lam', '--config', str(path), '--set', 'trainer.stpes=3']) == 2
    assert "did you mean 'trainer.steps'" in capsys.readouterr().err


def test_a_fresh_start_sets_old_checkpoints_aside(tmp_path):
    Trainer(ToyModel(), ToyRegression(), _cfg(steps=4, checkpoint_every=2), tmp_path).fit()
    fresh = Trainer(ToyModel(), ToyRegression(), _cfg(steps=2, checkpoint_every=2,
                                                       resume=False), tmp_path).fit()
    assert fresh.resumed_from == 0 and len(fresh.history) == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ['step_0000002']
    assert (tmp_path / 'checkpoints.replaced' / 'step_0000004').is_dir()
