"""Model configuration: presets, overrides, validation and YAML round trips."""
from __future__ import annotations

from pathlib import Path

import pytest

from iflybot_vla_policy.config import (
    config_from_yaml,
    config_to_yaml,
    get_config,
)


def test_paper_preset_has_the_papers_shapes():
    cfg = get_config('paper')
    assert cfg.backbone.kind == 'qwen2_5_vl'
    assert (cfg.backbone.hidden, cfg.backbone.layers) == (2048, 36)
    assert (cfg.expert.width, cfg.expert.heads) == (1024, 16)
    assert (cfg.action.horizon, cfg.action.action_dim, cfg.action.state_dim) == (30, 20, 20)
    assert cfg.flow.denoise_steps == 5
    assert (cfg.tokens.latent_tokens, cfg.tokens.latent_codebook) == (8, 32)
    assert cfg.tokens.fast_vocab == 2048
    assert cfg.loss.knowledge_insulation


def test_tiny_preset_is_a_small_cpu_model():
    cfg = get_config('tiny')
    assert cfg.backbone.kind == 'tiny'
    assert cfg.image_size <= 224
    assert cfg.action.horizon * cfg.action.dt == pytest.approx(1.6)
    assert cfg.cameras == ('scene_camera', 'wrist_camera')


def test_token_ids_follow_the_text_vocabulary():
    cfg = get_config('tiny')
    assert cfg.latent_offset == cfg.backbone.text_vocab
    assert cfg.fast_offset == cfg.latent_offset + cfg.tokens.latent_codebook
    assert cfg.vocab_size == cfg.fast_offset + cfg.tokens.fast_vocab


def test_dotted_override_changes_only_that_field():
    base = get_config('tiny')
    cfg = get_config('tiny', {'flow.denoise_steps': 10, 'backbone.vision.token_grid': 4})
    assert cfg.flow.denoise_steps == 10
    assert cfg.backbone.vision.token_grid == 4
    assert cfg.expert == base.expert


def test_unknown_key_is_named_with_a_suggestion():
    hint = r"'flow\.denoise_step'.*did you mean 'flow\.denoise_steps'"
    with pytest.raises(ValueError, match=hint):
        get_config('tiny', {'flow.denoise_step': 3})


def test_wrong_type_is_rejected_naming_the_key():
    with pytest.raises(ValueError, match=r"'action\.horizon' must be an integer"):
        get_config('tiny', {'action.horizon': 'long'})


def test_cross_field_validation_names_the_key():
    with pytest.raises(ValueError, match=r"'expert\.heads'"):
        get_config('tiny', {'expert.heads': 3})
    with pytest.raises(ValueError, match=r"'action\.space'"):
        get_config('tiny', {'action.space': 'torque'})
    with pytest.raises(ValueError, match=r"'image_size'.*28"):
        get_config('paper', {'image_size': 96})


def test_named_yaml_configs_in_the_repository_load():
    ee = get_config('tiny_ee')
    assert ee.action.space == 'ee_delta' and ee.robot_action_dim == 7
    assert get_config('tiny_flow_only').tokens.latent_tokens == 0
    smol = get_config('paper_smolvlm')
    assert smol.backbone.kind == 'smolvlm' and smol.expert.width == 576


def test_yaml_file_errors_name_the_file_and_key(tmp_path: Path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('base: tiny\noverrides:\n  expert:\n    widht: 128\n')
    with pytest.raises(ValueError, match=r"bad\.yaml.*'expert\.widht'.*'expert\.width'"):
        get_config(str(bad))


def test_unknown_preset_name_suggests_close_match():
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        get_config('tinny')


def test_config_survives_a_yaml_round_trip():
    for name in ('tiny', 'paper', 'paper_smolvlm'):
        cfg = get_config(name)
        assert config_from_yaml(config_to_yaml(cfg)) == cfg
