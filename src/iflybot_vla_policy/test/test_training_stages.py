"""A few steps of each training stage on a tiny real dataset written by the project's writer."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from iflybot_vla_policy.training.config import load_train_config  # noqa: E402
from training_toy import write_toy_dataset  # noqa: E402


@pytest.fixture(scope='module')
def toy_dataset(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp('data') / 'toy')


def _config(tmp_path: Path, text: str, **overrides):
    path = tmp_path / 'cfg.yaml'
    path.write_text(text)
    return load_train_config(path, overrides)


def test_lam_stage_trains_and_exports_a_loadable_lam(tmp_path, toy_dataset):
    from iflybot_vla_policy.model.lam import LatentActionModel
    from iflybot_vla_policy.training.lam_stage import build_pairs, run_lam

    cfg = _config(tmp_path, f"""
stage: lam
output_dir: {tmp_path / 'lam'}
data: {{datasets: ['{toy_dataset}'], frame_gap_s: 1.0}}
lam: {{image_size: 32, patch: 8, width: 32, depth: 1, decoder_depth: 1}}
trainer: {{steps: 6, batch_size: 8, checkpoint_every: 3, progress: false,
          optim: {{lr: 1.0e-3, warmup_steps: 1}}}}
""")
    pairs = build_pairs(cfg, 32)
    item = pairs[0]
    assert item['frame'].shape == (32, 32, 3) and len(pairs) == 3 * 24
    # gap of 1 s at 10 fps = 10 frames; the later frame is clipped at the episode's end
    assert pairs.index[0].tolist() == [0, 0, 10] and pairs.index[23].tolist() == [0, 23, 23]
    summary = run_lam(cfg)
    assert summary['steps'] == 6 and summary['loss'] > 0
    lam = LatentActionModel.load(tmp_path / 'lam' / 'final')
    codes = lam.encode(item['frame'][None], item['next_frame'][None])
    assert codes.shape == (1, 8) and int(codes.max()) < 32
    assert (tmp_path / 'lam' / 'metrics.csv').is_file()


def test_fast_stage_fits_a_tokenizer_on_normalised_chunks(tmp_path, toy_dataset):
    from iflybot_vla_policy.model.fast import FastTokenizer
    from iflybot_vla_policy.training.fast_stage import run_fast
    from iflybot_vla_policy.transforms import NormStatsSet

    cfg = _config(tmp_path, f"""
stage: fast
output_dir: {tmp_path / 'fast'}
model_overrides: {{tokens.fast_vocab: 256}}
data: {{datasets: ['{toy_dataset}']}}
""")
    summary = run_fast(cfg)
    fast = FastTokenizer.load(tmp_path / 'fast' / 'final')
    assert fast.vocab_size <= 256 and summary['tokens_mean'] > 0
    assert summary['roundtrip_max_abs_error'] < 0.5 * 16 ** 0.5 / fast.config.scale
    norm = NormStatsSet.load(tmp_path / 'fast' / 'final' / 'norm_stats.json')
    assert norm.mode == 'quantile' and norm.actions.dim == 8
    # joint actions are relative to the current state: their median is near zero
    assert abs(float(norm.actions.mean[0])) < 0.1


TINY_MODEL = ('{image_size: 32, backbone.hidden: 64, backbone.layers: 2, backbone.heads: 2, '
              'backbone.kv_heads: 1, backbone.head_dim: 32, backbone.intermediate: 128, '
              'backbone.vision.channels: [8, 16], backbone.vision.token_grid: 2, '
              'expert.width: 64, expert.heads: 2, tokens.fast_vocab: 256}')


@pytest.fixture(scope='module')
def stage_outputs(tmp_path_factory, toy_dataset) -> Path:
    """lam and fast stages run once through `iflybot train` for the vla tests."""
    from iflybot_vla_policy.cli import main

    root = tmp_path_factory.mktemp('stages')
    (root / 'lam.yaml').write_text(f"""
stage: lam
output_dir: {root / 'lam'}
model_overrides: {TINY_MODEL}
data: {{datasets: ['{toy_dataset}']}}
lam: {{image_size: 32, patch: 8, width: 32, depth: 1, decoder_depth: 1}}
trainer: {{steps: 2, batch_size: 8, progress: false}}
""")
    (root / 'fast.yaml').write_text(f"""
stage: fast
output_dir: {root / 'fast'}
model_overrides: {TINY_MODEL}
data: {{datasets: ['{toy_dataset}']}}
""")
    assert main(['train', 'lam', '--config', str(root / 'lam.yaml')]) == 0
    assert main(['train', 'fast', '--config', str(root / 'fast.yaml')]) == 0
    return root


def _vla_yaml(root: Path, out: Path, dataset: Path, steps: int = 4, extra: str = '',
              vqa_ratio: float = 0.25, data_extra: str = '') -> Path:
    path = out.with_suffix('.yaml')
    path.write_text(f"""
stage: vla
output_dir: {out}
model_overrides: {TINY_MODEL}
lam_dir: {root / 'lam'}
fast_dir: {root / 'fast'}
data: {{datasets: ['{dataset}'], vqa_ratio: {vqa_ratio}, vqa_tasks: [pick_place],
       vqa_scenes: 2{data_extra}}}
trainer: {{steps: {steps}, batch_size: 8, checkpoint_every: 2, progress: false, ema_decay: 0.5,
          knowledge_insulation: true, optim: {{lr: 1.0e-3, warmup_steps: 1}}{extra}}}
""")
    return path


def test_vla_stage_trains_all_losses_with_vqa_and_exports_a_policy(tmp_path, toy_dataset,
                                                                    stage_outputs, capsys):
    import csv

    import numpy as np

    from iflybot_vla_policy.cli import main
    from iflybot_vla_policy.policy import Policy

    out = tmp_path / 'vla'
    capsys.readouterr()
    assert main(['train', 'vla', '--config', str(_vla_yaml(
        stage_outputs, out, toy_dataset, data_extra=', balance_tasks: true'))]) == 0
    assert '"frames_per_task"' in capsys.readouterr().out     # balanced over the tasks found
    rows = list(csv.DictReader((out / 'metrics.csv').open()))
    assert len(rows) == 4
    for key in ('flow', 'latent', 'fast', 'text'):
        assert all(float(r[key]) > 0 for r in rows), key   # VQA in every batch at 25 %
    policy = Policy.from_checkpoint(out / 'policy')
    assert policy.cfg.loss.knowledge_insulation and policy.fast is not None
    assert policy.lam is not None
    state = np.array([0.0, -0.7, 0.0, -2.3, 0.0, 1.6, 0.8, 0.08], np.float32)
    obs = {'images': {c: np.zeros((64, 64, 3), np.uint8)
                      for c in ('scene_camera', 'wrist_camera')},
           'state': state, 'instruction': 'move the red block'}
    result = policy.infer(obs)
    assert result['actions'].shape == (16, 8) and np.all(np.isfinite(result['actions']))
    # normalisation statistics come from the dataset (joint deltas, absolute gripper)
    assert policy.norm_stats.mode == 'quantile'
    assert 0.0 <= float(policy.norm_stats.actions.q01[7]) <= 0.03


def test_vla_resume_reproduces_the_uninterrupted_losses(tmp_path, toy_dataset, stage_outputs):
    import csv

    from iflybot_vla_policy.cli import main

    straight = tmp_path / 'straight'
    assert main(['train', 'vla', '--config',
                 str(_vla_yaml(stage_outputs, straight, toy_dataset, vqa_ratio=0.0))]) == 0
    split = tmp_path / 'split'
    cfg = _vla_yaml(stage_outputs, split, toy_dataset, extra=', max_steps_per_run: 2',
                    vqa_ratio=0.0)
    assert main(['train', 'vla', '--config', str(cfg)]) == 0          # stops at step 2
    assert len(list(csv.DictReader((split / 'metrics.csv').open()))) == 2
    assert main(['train', 'vla', '--config', str(cfg)]) == 0          # resumes, runs 3-4
    a = [float(r['loss']) for r in csv.DictReader((straight / 'metrics.csv').open())]
    b = [float(r['loss']) for r in csv.DictReader((split / 'metrics.csv').open())]
    assert len(b) == 4
    assert b == pytest.approx(a, rel=1e-5)


def test_vla_stage_without_fast_dir_names_the_missing_key(tmp_path, toy_dataset, stage_outputs):
    from iflybot_vla_policy.training.vla_stage import run_vla

    path = _vla_yaml(stage_outputs, tmp_path / 'v', toy_dataset)
    path.write_text(path.read_text().replace(f"fast_dir: {stage_outputs / 'fast'}", ''))
    with pytest.raises(ValueError, match='fast_dir'):
        run_vla(load_train_config(path))


def _with_grounding(path: Path, init_from: Path | None = None) -> Path:
    """The vla YAML at `path` with the grounding head on (and a warm start)."""
    text = path.read_text().replace(
        f'model_overrides: {TINY_MODEL}',
        f'model_overrides: {TINY_MODEL[:-1]}, loss.grounding_weight: 1.0}}')
    path.write_text(text + (f'init_from: {init_from}\n' if init_from else ''))
    return path


def test_vla_stage_warm_starts_from_a_policy_and_trains_the_grounding_head(
        tmp_path, stage_outputs, capsys):
    import csv

    from iflybot_vla_policy.cli import main
    from iflybot_vla_policy.policy import Policy

    # same numbers as toy_dataset (so the fitted FAST matches); instructions from the sim
    data = write_toy_dataset(tmp_path / 'grounded', sim_instructions=True)
    base = tmp_path / 'base'
    assert main(['train', 'vla', '--config',
                 str(_vla_yaml(stage_outputs, base, data, steps=2, vqa_ratio=0.0))]) == 0
    out = tmp_path / 'ground'
    cfg = _with_grounding(_vla_yaml(stage_outputs, out, data, steps=2, vqa_ratio=0.0),
                          init_from=base / 'policy')
    capsys.readouterr()
    assert main(['train', 'vla', '--config', str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert f"init_from {base / 'policy'}:" in printed
    assert '4 new (grounding_head)' in printed
    rows = list(csv.DictReader((out / 'metrics.csv').open()))
    assert len(rows) == 2 and all(float(r['ground']) > 0 for r in rows)
    assert Policy.from_checkpoint(out / 'policy').cfg.loss.grounding_weight == 1.0


def test_grounding_refuses_episodes_whose_seed_rebuilds_another_scene(
        tmp_path, toy_dataset, stage_outputs):
    from iflybot_vla_policy.training.vla_stage import run_vla

    # toy_dataset records seeds 0-2 but made-up instructions: targets would be wrong
    path = _with_grounding(_vla_yaml(stage_outputs, tmp_path / 'v', toy_dataset))
    with pytest.raises(ValueError, match='episode 0 .*seed 0.* another simulator version'):
        run_vla(load_train_config(path))


def test_warm_start_from_a_folder_without_weights_is_a_clear_error(
        tmp_path, toy_dataset, stage_outputs):
    from iflybot_vla_policy.training.vla_stage import run_vla

    path = _vla_yaml(stage_outputs, tmp_path / 'v', toy_dataset)
    path.write_text(path.read_text() + f"init_from: {tmp_path / 'nowhere'}\n")
    with pytest.raises(FileNotFoundError, match='init_from: .*nowhere is not a Policy'):
        run_vla(load_train_config(path))


def test_mixed_plan_puts_seven_percent_vqa_in_every_batch_spread_over_processes():
    from iflybot_vla_policy.training.trainer import shard
    from iflybot_vla_policy.training.vla_data import MixedPlan

    plan = MixedPlan(n_robot=1000, n_vqa=300, batch_size=32, ratio=0.07, seed=0)
    counts = []
    for step in range(500):
        batch = plan.global_indices(step)
        assert len(batch) == 32
        vqa = [i for i in batch if i >= 1000]
        assert all(i < 1300 for i in vqa)
        counts.append(len(vqa))
        for rank in range(2):   # each of 2 processes gets one or two of them
            assert any(i >= 1000 for i in shard(batch, rank, 2))
    assert set(counts) == {2, 3}
    assert sum(counts) / (500 * 32) == pytest.approx(0.07, abs=0.0005)
    # robot items walk whole epochs: the first 1000 robot items are all distinct
    robot = [i for s in range(40) for i in plan.global_indices(s) if i < 1000][:1000]
    assert len(set(robot)) == 1000


def test_task_balanced_batches_hold_every_task_equally_however_unequal_their_frames():
    import numpy as np

    from iflybot_vla_policy.training.vla_data import MixedPlan

    # pick_place 3,000 frames, stack 1,000, drawer 300: unbalanced, a batch of 32 holds ~3
    # drawer frames; balanced, 10-11 of each task, and every task still walks whole epochs.
    sizes = {'pick_place': 3000, 'stack': 1000, 'drawer': 300}
    task = np.repeat(np.arange(3), list(sizes.values()))
    groups = [np.nonzero(task == k)[0] for k in range(3)]
    plan = MixedPlan(len(task), 100, 32, 0.07, seed=0, robot_groups=groups)
    again = MixedPlan(len(task), 100, 32, 0.07, seed=0, robot_groups=groups)
    seen = {k: [] for k in range(3)}
    for step in range(100):
        batch = plan.global_indices(step)
        assert batch == again.global_indices(step)         # seeded, any step on its own
        robot = [i for i in batch if i < len(task)]
        counts = np.bincount(task[robot], minlength=3)
        assert counts.max() - counts.min() <= 1, counts
        for i in robot:
            seen[int(task[i])].append(i)
    drawer = seen[2][:300]
    assert sorted(drawer) == list(range(4000, 4300))          # one whole epoch of drawer frames
    plain = MixedPlan(len(task), 100, 32, 0.07, seed=0)
    share = np.mean([np.mean(task[[i for i in plain.global_indices(s) if i < len(task)]] == 2)
                     for s in range(100)])
    assert share < 0.1                                          # the unbalanced plan: ~7%


def test_ablation_trains_each_variant_with_only_its_targets_and_tables_cis(
        tmp_path, toy_dataset, stage_outputs):
    import csv
    import json

    from iflybot_vla_policy.cli import main
    from iflybot_vla_policy.policy import Policy

    base = _vla_yaml(stage_outputs, tmp_path / 'base', toy_dataset)
    out = tmp_path / 'ablation'
    assert main(['ablate', '--config', str(base), '--heldout', str(toy_dataset),
                 '--steps', '2', '--frame-stride', '8', '--out', str(out)]) == 0
    doc = json.loads((out / 'ablation.json').read_text())
    assert list(doc['variants']) == ['flow', 'flow+fast', 'flow+lam', 'full']
    for name, row in doc['variants'].items():
        rows = list(csv.DictReader((out / name / 'metrics.csv').open()))
        assert len(rows) == 2 and row['steps'] == 2, name
        used = {k for k in ('flow', 'latent', 'fast', 'text') if float(rows[0][k]) > 0}
        assert used == {'flow': {'flow'}, 'flow+fast': {'flow', 'fast'},
                        'flow+lam': {'flow', 'latent'},
                        'full': {'flow', 'fast', 'latent', 'text'}}[name]
        low, high = row['arm_error_ci95']
        assert 0 < low <= row['arm_error'] <= high and row['episodes_scored'] == 3
        policy = Policy.from_checkpoint(out / name / 'policy')
        assert (policy.fast is not None) == ('fast' in used)
        assert (policy.lam is not None) == ('latent' in used)
    low, high = doc['meta']['hold_arm_error_ci95']
    assert 0 < low <= doc['meta']['hold_arm_error'] <= high
    table = (out / 'ablation.md').read_text()
    assert sum(line.startswith('| ') for line in table.splitlines()) == 6
    assert '| hold (baseline) |' in table


def test_ablation_grounding_variant_scores_where_its_head_puts_the_named_object(
        tmp_path, stage_outputs):
    import json

    from iflybot_vla_policy.cli import main
    from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset
    from iflybot_vla_policy.training.grounding import episode_grounding

    data = write_toy_dataset(tmp_path / 'grounded', sim_instructions=True)
    base = _vla_yaml(stage_outputs, tmp_path / 'base', data, vqa_ratio=0.0)
    out = tmp_path / 'ablation'
    assert main(['ablate', '--config', str(base), '--heldout', str(data), '--steps', '2',
                 '--frame-stride', '4', '--variants', 'flow,flow+ground',
                 '--out', str(out)]) == 0
    doc = json.loads((out / 'ablation.json').read_text())
    ground, flow = doc['variants']['flow+ground'], doc['variants']['flow']
    assert 'object_error' not in flow
    # the toy episodes close the gripper half-way: every episode has frames before the grasp
    truth = episode_grounding(LeRobotDataset(data))
    assert truth.known.all()
    for key in ('object', 'goal'):
        low, high = ground[f'{key}_error_ci95']
        assert 0 < low <= ground[f'{key}_error'] <= high < 1.0   # metres, on the table
    table = (out / 'ablation.md').read_text()
    assert 'object / goal position error (cm, 95% CI)' in table
    assert '| flow | flow matching only |' in table and '| - |' in table


def test_grounding_errors_are_distances_in_metres_over_frames_before_the_grasp():
    import numpy as np

    from iflybot_vla_policy.training.ablation import HeldoutEpisode, grounding_errors

    truth = np.array([[0.5, 0.1, 0.02], [0.4, -0.2, 0.0]])

    class Shifted:
        """Answers every frame with the truth moved 3 cm in x and 4 cm in y (5 cm)."""
        has_grounding = True

        def ground(self, obs: list) -> np.ndarray:
            return np.repeat((truth + [0.03, 0.04, 0.0])[None], len(obs), axis=0)

    n = 6
    ep = HeldoutEpisode(images={'scene_camera': np.zeros((n, 8, 8, 3), np.uint8)},
                        states=np.zeros((n, 8)), instructions=['x'] * n,
                        targets=np.zeros((n, 4, 8)), grounding=truth,
                        grounding_mask=np.arange(n) < 4)
    no_target = HeldoutEpisode(images=ep.images, states=ep.states, instructions=ep.instructions,
                               targets=ep.targets)
    errors = grounding_errors(Shifted(), [ep, no_target])
    assert errors['object'] == pytest.approx([0.05]) and errors['goal'] == pytest.approx([0.05])


def test_ablation_rejects_unknown_variants_and_non_vla_configs(tmp_path, toy_dataset,
                                                               stage_outputs):
    from iflybot_vla_policy.cli import main

    base = _vla_yaml(stage_outputs, tmp_path / 'base', toy_dataset)
    assert main(['ablate', '--config', str(base), '--heldout', str(toy_dataset),
                 '--variants', 'flow,lam_only']) == 2
    lam = stage_outputs / 'lam.yaml'
    assert main(['ablate', '--config', str(lam), '--heldout', str(toy_dataset)]) == 2


def test_cached_frames_are_held_in_ram_when_they_fit_and_memory_mapped_when_not(
        tmp_path, toy_dataset, monkeypatch):
    import numpy as np

    from iflybot_vla_policy.data.lerobot_reader import LeRobotDataset
    from iflybot_vla_policy.training import vla_data

    ds = LeRobotDataset(toy_dataset)
    cameras = ('scene_camera', 'wrist_camera')
    decoded = vla_data.model_images(ds, cameras, 32, cache=None)     # (N, 2, 3, 32, 32)
    assert decoded.shape == (ds.num_frames, 2, 3, 32, 32) and decoded.dtype == np.uint8
    first = vla_data.model_images(ds, cameras, 32, cache=tmp_path)   # decodes and saves
    again = vla_data.model_images(ds, cameras, 32, cache=tmp_path)   # reads the file back
    for array in (decoded, first, again):
        assert not isinstance(array, np.memmap)
        np.testing.assert_array_equal(array, decoded)
    monkeypatch.setattr(vla_data, 'RAM_RESERVE_BYTES', 1 << 60)       # no RAM to spare
    mapped = vla_data.model_images(ds, cameras, 32, cache=tmp_path)
    fresh = vla_data.model_images(ds, cameras, 32, cache=tmp_path / 'other')
    for array in (mapped, fresh):
        assert isinstance(array, np.memmap)
        np.testing.assert_array_equal(array, decoded)
