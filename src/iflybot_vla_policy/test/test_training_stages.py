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
